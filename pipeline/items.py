"""One stage invocation's LLM work (teacher, judge): ``run_stage_items`` puts the item runner
(pipeline.llm.runner, a library) together with the stage machinery: the stage's records, its shard, its
share of budget and rate limit, the embedded server, and a StageError when items are left."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from pipeline.config import LLMSection
from pipeline.context import StageContext
from pipeline.errors import StageError, StoreError
from pipeline.llm.client import LLMClient
from pipeline.llm.runner import RunSummary, run_items, store_spilled
from pipeline.llm.server import embedded_server
from pipeline.records import RecordSet

log = logging.getLogger("ielts_distill.llm")
T = TypeVar("T")


def run_stage_items(ctx: StageContext, llm_cfg: LLMSection, items: Sequence[T],
                    handle: Callable[[T, LLMClient], Awaitable[dict[str, Any]]], *, item_id: Callable[[T], str],
                    noun: str = "items", inputs: str | None = None, **kwargs: Any) -> RunSummary:
    """A sharded stage's LLM work in one call: store what an earlier run spilled, set aside records made from
    other ``inputs`` (a fingerprint, see RecordSet.keep_if_inputs; they come back if this run fails before
    writing a new record), list this shard's pending items (none: return at once, without starting
    anything), start the embedded server if configured, give this shard its share of ``budget_usd`` and of
    ``requests_per_minute`` (shards run at once and split both evenly), ``run_items`` over ``ctx.records()``
    and ``ctx.shard``, and raise StageError when the run stopped early or items stay pending after transient
    errors ("N items pending: rerun"). ``kwargs`` go to run_items (``outcome``, ``reason``)."""
    records = ctx.records()
    store_spilled(records)
    stale = records.keep_if_inputs(inputs) if inputs is not None else 0
    if stale:
        log.warning("%s: inputs changed since the last run: %d stale %s moved to %s", ctx.stage, stale, noun,
                    ctx.store.url(records.aside or ""))
    try:
        return _run(ctx, llm_cfg, items, handle, records, item_id, noun, **kwargs)
    except BaseException:
        try:
            if stale and records.restore_stale():
                log.warning("%s: no new record written: the %d set-aside %s are back", ctx.stage, stale, noun)
        except StoreError:
            pass  # the store is down: they stay under _stale/
        raise


def _run(ctx: StageContext, llm_cfg: LLMSection, items: Sequence[T], handle, records: RecordSet,
         item_id: Callable[[T], str], noun: str, **kwargs: Any) -> RunSummary:
    name = ctx.stage
    ids = [item_id(i) for i in items]
    pending = records.pending(ids, ctx.shard)
    if not pending:
        total = len(ctx.shard.select(ids))
        return RunSummary(total=total, skipped=total)
    # the shards of a stage run at once (an Indexed Job's parallelism is its shard count): each gets its
    # share of the budget and of the rate limit, so that N pods together keep to the configured figures
    budget = llm_cfg.budget_usd / ctx.shard.count if llm_cfg.budget_usd else None
    rpm = llm_cfg.requests_per_minute / ctx.shard.count if llm_cfg.requests_per_minute else None
    with embedded_server(llm_cfg) as live:
        client = LLMClient(live, name=name, budget_usd=budget, requests_per_minute=rpm)
        summary = run_items(items, handle, records=records, client=client, item_id=item_id, shard=ctx.shard,
                            desc=name if ctx.shard.whole else f"{name} {ctx.shard}", pending=pending,
                            outage_s=ctx.config.store.outage_s, lease_s=ctx.config.store.claim_lease_s, **kwargs)
    if summary.stopped:
        raise StageError(f"{name}: {summary.stopped}; {summary.left} {noun} left without a record "
                         "(finished ones are kept; rerun to continue)")
    if summary.transient:
        first = next(iter(summary.transient.items()))
        raise StageError(f"{name}: {len(summary.transient)} {noun} pending: rerun (transient errors, e.g. "
                         f"{first[0]}: {first[1]}; {summary.written} recorded now)")
    return summary
