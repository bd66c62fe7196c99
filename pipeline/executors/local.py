"""The local executor: runs a stage (or one shard of it) in this process against the configured store."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from pipeline.config import RunConfig
from pipeline.context import StageContext
from pipeline.executors import base
from pipeline.executors.base import Executor, Outcome, run_one
from pipeline.records import Shard
from pipeline.stages import StageSpec, load_stage
from pipeline.store import SUCCESS, ArtifactStore


class LocalExecutor(Executor):
    def run_stage(self, spec: StageSpec, ctx: StageContext) -> Outcome:
        """Returns ``complete``, or ``shard done`` when other shards of the stage are still to finish."""
        module = load_stage(spec.name)
        started = time.monotonic()
        self.echo(f"[{spec.name}] started" + ("" if ctx.shard.whole else f" (shard {ctx.shard})"))
        module.run(ctx)
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


def run_stage(config: RunConfig, store: ArtifactStore, name: str, shard: Shard | None = None,
              force: bool = False) -> bool:
    """Run one stage (or shard) in process through the pipeline's skip rule; True when the stage is
    complete afterwards (False: this shard is done, others are not)."""
    ctx = StageContext(config=config, store=store, stage=name, shard=shard or Shard())
    return run_one(LocalExecutor(config, store), ctx, force).state in ("complete", "skipped")


def run_pipeline(config: RunConfig, stages: Sequence[str], force: bool = False) -> ArtifactStore:
    return base.run_pipeline(LocalExecutor(config), stages, force=force)
