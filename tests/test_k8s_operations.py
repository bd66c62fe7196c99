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


def _count_listings(monkeypatch) -> dict[str, int]:
    """The store's listing cost, counted where it is paid: each ListObjectsV2 request the S3 server answers
    (botocore's after-call event) and the names it returned; on a local directory each list/children call."""
    from pipeline.store import LocalStore, S3Store

    cost = {"calls": 0, "names": 0}

    def paid(names: int) -> None:
        cost["calls"] += 1
        cost["names"] += names

    connect = S3Store._connect

    def counted_connect(self):
        client = connect(self)
        client.meta.events.register("after-call.s3.ListObjectsV2", lambda parsed, **_: paid(
            len(parsed.get("Contents", [])) + len(parsed.get("CommonPrefixes", []))))
        return client

    def counted(method):
        def call(self, *args, **kwargs):
            names = list(method(self, *args, **kwargs))
            paid(len(names))
            return names
        return call

    monkeypatch.setattr(S3Store, "_connect", counted_connect)
    monkeypatch.setattr(LocalStore, "list", counted(LocalStore.list))
    monkeypatch.setattr(LocalStore, "children", counted(LocalStore.children))
    return cost


def _runs_cost(store_uri: str, records: int, monkeypatch) -> tuple[list[dict], dict[str, int]]:
    """A store of two runs (alpha: ingest done with its images, teacher partway through ``records`` records;
    beta: ingest done, the dataset, one variant's training and one test chart's generation begun, only the
    runner's claim and fingerprint beside judge's records) and a folder that is no run; then
    ``runs --json`` and what its listings cost."""
    from pipeline.artifacts import save_run_config
    from pipeline.records import Claims

    cost = _count_listings(monkeypatch)
    for run_id in ("alpha", "beta"):
        config = load_config(None, [f"store.uri={store_uri}", f"run.id={run_id}"])
        store = store_for(config)
        save_run_config(config, store)
        StageContext(config=config, store=store, stage="ingest").complete({})
        ctx = StageContext(config=config, store=store, stage="teacher" if run_id == "alpha" else "judge")
        if run_id == "alpha":
            for i in range(records):
                store.put_bytes(f"alpha/ingest/images/chart-{i:05d}.png", b"png")
                ctx.records().write(f"chart-{i:05d}", {"essay": "x"})
        else:
            store.put_json("beta/dataset/splits.json", {"c1": "test", "c2": "train"})
            store.put_json(f"beta/finetune/{config.finetune.units()[0][0]}/summary.json", {})
            StageContext(config=config, store=store, stage="generate").records("baseline").write("c1", {})
            ctx.records().keep_if_inputs("fp")
            Claims(ctx.records()).take("chart-00000")
    store.put_text("_cache/no-run.bin", "x")
    cost.update(calls=0, names=0)
    result = CliRunner().invoke(main, ["runs", "--json", "--set", f"store.uri={store_uri}"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output), dict(cost)


def _listing_is_bounded(store_uri: str, monkeypatch) -> list[dict]:
    """``runs`` with 20 records, then with 80: the same LIST calls and listed names, and few of them."""
    rows, few = _runs_cost(store_uri, 20, monkeypatch)
    again, many = _runs_cost(store_uri, 80, monkeypatch)
    assert again == rows
    assert many == few, f"runs listed more with more records: {few} -> {many}"
    assert few["calls"] <= 20 and few["names"] <= 60, few  # the root, a few a stage (7 a run; locally each folder's check)
    return rows


def test_runs_lists_run_folders_and_stage_markers_not_the_records(store_uri, monkeypatch):
    """``runs`` on a large bucket: one delimiter listing for the run folders, then each run's config and
    stage markers; how many LIST calls and names it costs does not grow with the records. Its states are
    those ``status`` reads from every record (``stage_status``)."""
    from pipeline.status import stage_status

    rows = _listing_is_bounded(store_uri, monkeypatch)
    expected = []
    for run_id in ("alpha", "beta"):
        config = load_config(None, [f"store.uri={store_uri}", f"run.id={run_id}"])
        expected.append({"run": run_id, "stages": {r["stage"]: r["state"] for r in stage_status(config)}})
    assert rows == expected
    assert rows[0]["stages"]["teacher"] == "partial"
    assert [rows[1]["stages"][s] for s in ("dataset", "finetune", "generate")] == ["partial"] * 3
    assert rows[1]["stages"]["judge"] == "not started"  # a claim and a fingerprint are no record


def test_runs_that_list_the_whole_store_fail_the_listing_check(store_uri, monkeypatch):
    """The check above catches an implementation that lists everything and keeps one level of it."""
    from pipeline.store import LocalStore, S3Store

    def children_of_everything(self, prefix: str = "", limit: int | None = None) -> list[str]:
        names = sorted({prefix + k[len(prefix):].split("/")[0] + ("/" if "/" in k[len(prefix):] else "")
                        for k in self.list(prefix)})
        return names[:limit]

    for cls in (LocalStore, S3Store):
        monkeypatch.setattr(cls, "children", children_of_everything)
    with pytest.raises(AssertionError, match="runs listed more with more records"):
        _listing_is_bounded(store_uri, monkeypatch)
