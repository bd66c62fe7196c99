"""Issue 28 #6, an operator's daily tools: ``logs STAGE [--shard I]`` (live from the pods, or from the store once
they are gone: every stage Job keeps its log there), ``cancel`` (the run's Jobs, not the store) and ``runs``."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from kubernetes import client as k
from test_k8s_driver import NS, Emulator, _kubeconfig

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.context import StageContext, store_for
from pipeline.k8s.client import KubeBackend
from pipeline.k8s.objects import build_driver_job, build_job

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster():
    emu = Emulator()
    emu.seed()
    yield emu
    emu.close()


def _sets(tmp_path, *extra: str) -> list[str]:
    out = []
    for item in ("run.id=t1", f"store.uri={tmp_path / 'store'}", "k8s.store_claim=ielts-store", f"k8s.namespace={NS}",
                 "teacher.parallelism=2", *extra):
        out += ["--set", item]
    return out


def test_a_stage_keeps_its_log_in_the_store_and_logs_reads_it_once_no_pod_is_left(tmp_path, sample_dir):
    sets = _sets(tmp_path, f"data.source={sample_dir}", "data.limit=3")
    ran = CliRunner().invoke(main, ["stage", "ingest", *sets])
    assert ran.exit_code == 0, ran.output
    failed = CliRunner().invoke(main, ["stage", "dataset", "--shard", "1/2", *sets])  # its inputs are missing
    assert failed.exit_code == 2
    shown = CliRunner().invoke(main, ["logs", "ingest", *sets])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0] == f"== {tmp_path / 'store' / 't1' / '_logs' / 'ingest' / 'all.log'}"
    assert any("ingest" in line and "INFO" in line for line in lines[1:]), lines
    kept = CliRunner().invoke(main, ["logs", "dataset", *sets]).output.splitlines()
    assert kept[0].endswith("t1/_logs/dataset/shard-1-of-2.log")
    assert kept[-1].startswith("error: stage 'dataset' needs stage 'teacher'"), kept  # a failed stage's too
    none = CliRunner().invoke(main, ["logs", "judge", *sets])
    assert none.exit_code == 1 and "no log of stage judge in run t1" in none.output
    bad = CliRunner().invoke(main, ["logs", "ingest", "--shard", "1", *sets])
    assert bad.exit_code == 1 and "--shard 1: stage ingest has no shards" in bad.output


def test_logs_reads_the_live_pods_first_and_one_shard(cluster, tmp_path):
    core = k.CoreV1Api(cluster.api())
    for index in (0, 1):
        name = f"ielts-t1-teacher-{index}-abc"
        labels = {"job-name": "ielts-t1-teacher", "batch.kubernetes.io/job-completion-index": str(index)}
        core.create_namespaced_pod(NS, {"metadata": {"name": name, "labels": labels},
                                        "spec": {"containers": [{"name": "teacher", "image": "x"}]}})
        cluster.logs[name] = f"teacher shard {index} says hello\n"
    args = ["logs", "teacher", "--executor", "k8s", "--kubeconfig", str(_kubeconfig(tmp_path, kmock=cluster.url))]
    both = CliRunner().invoke(main, [*args, *_sets(tmp_path)])
    assert both.exit_code == 0, both.output
    assert [line.split(" ", 1)[1] for line in both.output.splitlines()] == ["teacher shard 0 says hello",
                                                                           "teacher shard 1 says hello"]
    one = CliRunner().invoke(main, [*args, "--shard", "1", *_sets(tmp_path)])
    assert [line.split(" ", 1)[1] for line in one.output.splitlines()] == ["teacher shard 1 says hello"]


def test_cancel_deletes_the_runs_jobs_driver_first_and_keeps_the_store(cluster, tmp_path):
    config = load_config(None, _sets(tmp_path)[1::2])
    other = load_config(None, [*_sets(tmp_path)[1::2], "run.id=t2"])
    backend = KubeBackend(NS, cluster.api())
    for job in (build_job(config, "ingest"), build_job(config, "teacher"), build_driver_job(config, []),
                build_job(other, "ingest")):
        backend.create_job(job)
    StageContext(config=config, store=store_for(config), stage="ingest").complete({"charts": 3})
    result = CliRunner().invoke(main, ["cancel", "--kubeconfig", str(_kubeconfig(tmp_path, kmock=cluster.url)),
                                       *_sets(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["deleted job ielts-t1-driver", "deleted job ielts-t1-ingest",
                                          "deleted job ielts-t1-teacher",
                                          "run t1: 3 job(s) deleted; the store is kept (rerun to resume)"]
    left = [j["metadata"]["name"] for j in backend.list_jobs("app.kubernetes.io/name=ielts-distill")]
    assert left == ["ielts-t2-ingest"]
    assert store_for(config).exists("t1/ingest/_SUCCESS")


def test_runs_lists_the_runs_in_the_store_with_their_stage_states(tmp_path):
    store_uri = tmp_path / "store"
    for run_id, done in (("alpha", ("ingest", "teacher")), ("beta", ("ingest",))):
        config = load_config(None, [f"store.uri={store_uri}", f"run.id={run_id}"])
        from pipeline.artifacts import save_run_config

        save_run_config(config, store_for(config))
        for stage in done:
            StageContext(config=config, store=store_for(config), stage=stage).complete({})
    result = CliRunner().invoke(main, ["runs", "--set", f"store.uri={store_uri}"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["alpha", "ingest:done", "teacher:done", "dataset:not-started", "finetune:not-started",
                                "generate:not-started", "judge:not-started", "report:not-started"]
    assert lines[1].split()[:3] == ["beta", "ingest:done", "teacher:not-started"] and len(lines) == 2
    rows = json.loads(CliRunner().invoke(main, ["runs", "--json", "--set", f"store.uri={store_uri}"]).output)
    assert [r["run"] for r in rows] == ["alpha", "beta"] and rows[1]["stages"]["ingest"] == "done"
