"""The local executor: runs stages in order, in this process, against the configured store."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from pipeline.config import RunConfig
from pipeline.context import StageContext, save_run_config, store_for
from pipeline.errors import StageError
from pipeline.records import Shard
from pipeline.stages import load_stage
from pipeline.store import SUCCESS, ArtifactStore

log = logging.getLogger("ielts_distill")


def clear_stage(ctx: StageContext) -> int:
    """Forget a stage's outputs before a forced rerun, except its per-item records: a rerun must never
    request paid results again. Records whose inputs changed are dropped by the stage itself
    (``RecordSet.keep_if_inputs``)."""
    records = ctx.key("records") + "/"
    keys = [k for k in ctx.store.list(ctx.key("")) if not k.startswith(records)]
    ctx.store.delete(ctx.key(SUCCESS))  # first, so a crash mid-way never leaves a stale mark
    for key in keys:
        ctx.store.delete(key)
    return len(keys)


def skip_or_clear(ctx: StageContext, force: bool) -> bool:
    """The rule both executors follow: True when the stage is complete and not forced (skip it); a forced
    stage is cleared first (``clear_stage``), complete or not: a half-trained finetune restarts from zero."""
    if not force:
        return ctx.is_complete()
    clear_stage(ctx)
    return False


def run_stage(config: RunConfig, store: ArtifactStore, name: str, shard: Shard = Shard(),
              force: bool = False) -> bool:
    """Run one stage. Returns True when the stage is complete afterwards (False: this shard is done,
    others are not). A completed stage is skipped unless ``force``."""
    ctx = StageContext(config=config, store=store, stage=name, shard=shard)
    if skip_or_clear(ctx, force):
        log.info("[%s] already complete (%s): skipped", name, store.url(ctx.key(SUCCESS)))
        return True
    module = load_stage(name)
    started = time.monotonic()
    log.info("[%s] started%s", name, "" if shard.whole else f" (shard {shard})")
    module.run(ctx)
    done = ctx.is_complete()
    if not done and shard.whole:
        raise StageError(f"stage '{name}' returned without completing (no {SUCCESS}); see the log above")
    log.info("[%s] %s in %.1fs", name, "complete" if done else f"shard {shard} done", time.monotonic() - started)
    return done


def run_pipeline(config: RunConfig, stages: Sequence[str], force: bool = False) -> ArtifactStore:
    store = store_for(config)
    save_run_config(config, store)
    for name in stages:
        run_stage(config, store, name, force=force)
    return store
