"""One executor interface: the pipeline loop, the skip-or-clear rule (validate, then purge) and the CLI's
choice of executor from the config."""

from __future__ import annotations

import types

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.context import StageContext, store_for
from pipeline.errors import StageError
from pipeline.executors import base
from pipeline.executors.base import Executor, Outcome, executor_for, run_pipeline
from pipeline.executors.k8s import KubeExecutor
from pipeline.executors.local import LocalExecutor


class Recorder(Executor):
    """Completes every stage it is asked to run, and remembers which."""

    def __init__(self, config, fail: str | None = None):
        super().__init__(config)
        self.ran: list[str] = []
        self.fail = fail

    def run_stage(self, spec, ctx):
        self.ran.append(spec.name)
        if spec.name == self.fail:
            return Outcome(spec.name, False, "failed", f"stage {spec.name} failed: exit code 1")
        ctx.complete({"by": "recorder"})
        return Outcome(spec.name, True, "complete")

    def status(self, spec, ctx):
        return "ok"

    def logs(self, spec, ctx):
        return iter(())

    def cancel(self, spec, ctx):
        return False


def _config(tmp_path, *extra):
    return load_config(None, [f"store.uri={tmp_path / 'store'}", "run.id=ex", *extra])


def test_one_loop_skips_complete_stages_and_stops_at_a_failure(tmp_path):
    config = _config(tmp_path)
    first = Recorder(config)
    run_pipeline(first, ["ingest", "teacher"])
    assert first.ran == ["ingest", "teacher"]
    again = Recorder(config, fail="dataset")
    with pytest.raises(StageError, match="stage dataset failed: exit code 1"):
        run_pipeline(again, ["ingest", "teacher", "dataset", "finetune"])
    assert again.ran == ["dataset"]  # complete stages skipped; nothing after the failure
    assert (tmp_path / "store" / "ex" / "config.yaml").is_file()


def test_forced_rerun_validates_then_purges(tmp_path, monkeypatch):
    config = _config(tmp_path)
    store = store_for(config)
    ctx = StageContext(config=config, store=store, stage="teacher")
    ctx.store.put_text(ctx.key("essays.jsonl"), "{}\n")
    ctx.store.put_text(ctx.key("records", "a.json"), "{}")
    ctx.complete()
    seen = []

    def check(c):
        seen.append((c.stage, c.is_complete()))
        raise StageError("teacher: model 'x' is not served by teacher.base_url")

    monkeypatch.setattr(base, "load_stage", lambda name: types.SimpleNamespace(check=check))
    with pytest.raises(StageError, match="not served"):
        base.skip_or_clear(ctx, force=True)
    assert seen == [("teacher", True)]  # called while the outputs still existed ...
    assert ctx.is_complete() and store.exists(ctx.key("essays.jsonl"))  # ... and nothing was purged
    monkeypatch.setattr(base, "load_stage", lambda name: types.SimpleNamespace(check=lambda c: seen.append("ok")))
    assert base.skip_or_clear(ctx, force=True) is False
    assert not ctx.is_complete() and not store.exists(ctx.key("essays.jsonl"))
    assert store.exists(ctx.key("records", "a.json"))  # per-item records survive a forced rerun
    monkeypatch.setattr(base, "load_stage", lambda name: types.SimpleNamespace())  # check() is optional
    ctx.complete()
    assert base.skip_or_clear(ctx, force=False) is True and base.skip_or_clear(ctx, force=True) is False


def test_executors_share_the_interface_and_are_picked_from_config(tmp_path, monkeypatch):
    assert isinstance(executor_for("local", _config(tmp_path)), LocalExecutor)
    k8s = _config(tmp_path, "run.executor=k8s", "k8s.store_claim=store")
    for cls in (LocalExecutor, KubeExecutor):
        assert issubclass(cls, Executor) and not cls.__abstractmethods__
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["run", "--only", "ingest", "--set", "run.executor=k8s", "--set",
                                       f"store.uri={tmp_path / 'store'}", "--set", "k8s.store_claim=store"])
    assert result.exit_code == 1 and result.output.startswith("error: no Kubernetes configuration"), result.output
    assert k8s.run.executor == "k8s"
    bad = CliRunner().invoke(main, ["run", "--set", "run.executor=slurm"])
    assert bad.exit_code == 2 and "run.executor" in bad.output
