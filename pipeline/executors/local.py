"""The local executor: runs a stage (or one shard of it) in this process against the configured store."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipeline.config import RunConfig, dump_config
from pipeline.context import StageContext
from pipeline.executors import base
from pipeline.executors.base import Executor, Outcome, run_one
from pipeline.records import Shard
from pipeline.stages import StageSpec, launched_rank, load_stage
from pipeline.store import SUCCESS, ArtifactStore


class LocalExecutor(Executor):
    def run_stage(self, spec: StageSpec, ctx: StageContext) -> Outcome:
        """Returns ``complete``, or ``shard done`` when other shards of the stage are still to finish."""
        started = time.monotonic()
        self.echo(f"[{spec.name}] started" + ("" if ctx.shard.whole else f" (shard {ctx.shard})"))
        launcher = spec.launcher(ctx.config, python=sys.executable)
        rank = launched_rank()
        if launcher and rank is None:  # not yet one of the launcher's processes: start them
            code = launch(launcher, spec, ctx)
            if code != 0:
                return Outcome(spec.name, False, "failed", f"stage '{spec.name}': its processes ({shlex.join(launcher[:5])} "
                               f"...) failed (exit {code}); see their log above")
        else:
            load_stage(spec.name).run(ctx)
            if rank:  # one of the launcher's other processes: rank 0 completes the stage
                return Outcome(spec.name, True, "rank done")
        done = ctx.is_complete()
        if not done and ctx.shard.whole:
            return Outcome(spec.name, False, "failed",
                           f"stage '{spec.name}' returned without completing (no {SUCCESS}); see the log above")
        state = "complete" if done else "shard done"
        self.echo(f"[{spec.name}] {state if done else f'shard {ctx.shard} done'} in {time.monotonic() - started:.1f}s")
        return Outcome(spec.name, True, state, ctx.store.url(ctx.key(SUCCESS)) if done else "")

    def status(self, spec: StageSpec, ctx: StageContext) -> str:
        return "complete" if ctx.is_complete() else "not running (the local executor runs in the calling process)"

    def logs(self, spec: StageSpec, ctx: StageContext) -> Iterator[str]:
        return iter(())  # in-process: the log went to the caller's stderr

    def cancel(self, spec: StageSpec, ctx: StageContext) -> bool:
        return False  # Ctrl-C in the process that runs it; finished records stay


def launch(launcher: list[str], spec: StageSpec, ctx: StageContext) -> int:
    """Run ``<launcher> stage NAME`` on the resolved config (e.g. torchrun starting one CLI per GPU) and wait;
    a SIGTERM to this process is passed on, so the processes checkpoint before they stop."""
    with tempfile.TemporaryDirectory(prefix=f"ielts-{spec.name}-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(dump_config(ctx.config), encoding="utf-8")
        shard = [] if ctx.shard.whole else ["--shard", str(ctx.shard)]
        proc = subprocess.Popen([*launcher, "stage", spec.name, "--config", str(config_file), *shard])
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
        try:
            return proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)


def run_stage(config: RunConfig, store: ArtifactStore, name: str, shard: Shard | None = None,
              force: bool = False) -> bool:
    """Run one stage (or shard) in process through the pipeline's skip rule; True when the stage is
    complete afterwards (False: this shard is done, others are not)."""
    ctx = StageContext(config=config, store=store, stage=name, shard=shard or Shard())
    return run_one(LocalExecutor(config, store), ctx, force).state in ("complete", "skipped")


def run_pipeline(config: RunConfig, stages: Sequence[str], force: bool = False) -> ArtifactStore:
    return base.run_pipeline(LocalExecutor(config), stages, force=force)
