"""The item runner: "pending items" in, "one final record per item" out (teacher and judge).

``run_items`` drives an async handler over the items without a record; ``run_stage_items`` is the same for
one stage invocation (shard, budget share, embedded server) and turns an early stop into a StageError.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipeline.config import LLMSection
from pipeline.context import StageContext
from pipeline.errors import StageError
from pipeline.llm.client import BudgetExceeded, FatalLLMError, LLMClient, Usage
from pipeline.llm.server import embedded_server
from pipeline.records import RecordSet, Shard

log = logging.getLogger("ielts_distill.llm")
T = TypeVar("T")


@dataclass
class RunSummary:
    total: int  # items given (this shard's share)
    skipped: int  # already had a record
    outcomes: Counter = field(default_factory=Counter)  # outcome -> count, for records written now
    reasons: Counter = field(default_factory=Counter)  # reason key -> count, for records with a reason
    stopped: str | None = None  # why the run stopped early (budget, fatal endpoint error)
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return sum(self.outcomes.values())

    @property
    def left(self) -> int:
        return self.total - self.skipped - self.written

    def line(self, desc: str) -> str:
        u = self.usage
        out = ", ".join(f"{n} {k}" for k, n in self.outcomes.most_common()) or "0 written"
        why = f" ({', '.join(f'{k} {n}' for k, n in self.reasons.most_common())})" if self.reasons else ""
        extra = f"; {self.skipped} already done" if self.skipped else ""
        extra += f"; {self.left} left" if self.left else ""
        return (f"{desc}: {out}{why}{extra}; {u.requests} requests, {u.retries} retries, "
                f"{u.prompt_tokens + u.completion_tokens} tokens ({u.prompt_tokens} in, {u.completion_tokens} out), "
                f"${u.cost_usd:.4f}, {self.seconds:.1f}s")


def _default_outcome(record: dict[str, Any]) -> str:
    return str(record.get("status", "done"))


def _default_reason(record: dict[str, Any]) -> str | None:
    return record.get("reason_code") or record.get("reason")


def run_items(items: Sequence[T], handle: Callable[[T, LLMClient], Awaitable[dict[str, Any]]], *,
              records: RecordSet, client: LLMClient, item_id: Callable[[T], str], shard: Shard = Shard(),
              desc: str = "items", outcome: Callable[[dict], str] = _default_outcome,
              reason: Callable[[dict], str | None] = _default_reason, pending: list[str] | None = None) -> RunSummary:
    """Process every item of this shard that has no record yet; write one record per item when final.

    - ``items``: all items of the stage (any order); ``item_id(item)`` is its record id (may contain ``/``).
    - ``records.pending(ids, shard)`` decides what runs (or ``pending``, when the caller has just listed
      it): items with a record are never requested again.
    - ``handle(item, client) -> record``: an async function making its requests with ``client.chat`` and
      returning the item's final record (a JSON-able dict). It should turn ``LLMError`` into a record that
      says why (status ``rejected``/verdict ``invalid`` plus a reason); it may let BudgetExceeded and
      FatalLLMError through: the runner then stops starting items, lets the ones in flight end, and leaves
      the unfinished items without a record (pending for the next run). Any other exception is a bug in
      the handler (or a record that cannot be written): no new item starts, the ones in flight end and are
      recorded, and the exception propagates with its traceback.
    - Concurrency: at most ``client.cfg.concurrency`` requests in flight (the client's semaphore); up to
      twice as many items are in progress so that gating and writing never leave a request slot idle.
    - Progress: a tqdm bar (rate, ETA) with outcome counts; at the end one summary line is logged.
    - Returns a RunSummary (``summary.stopped`` is set when it stopped early). Runs its own event loop and
      closes ``client`` at the end: use one client per call.
    """
    return asyncio.run(_run_items(items, handle, records, client, item_id, shard, desc, outcome, reason, pending))


async def _run_items(items, handle, records, client, item_id, shard, desc, outcome, reason,
                     pending) -> RunSummary:
    from tqdm import tqdm

    ids = [item_id(i) for i in items]
    by_id = dict(zip(ids, items))
    if pending is None:
        pending = await asyncio.to_thread(records.pending, ids, shard)
    summary = RunSummary(total=len(shard.select(ids)), skipped=0, usage=client.usage)
    summary.skipped = summary.total - len(pending)
    started = time.monotonic()
    queue: asyncio.Queue = asyncio.Queue()
    for i in pending:
        queue.put_nowait(i)
    bugs: list[BaseException] = []
    bar = tqdm(total=len(pending), desc=desc, unit="item", dynamic_ncols=True, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 10.0, disable=not pending)

    async def worker() -> None:
        while summary.stopped is None and not queue.empty():
            iid = queue.get_nowait()
            if not client.budget_left():
                summary.stopped = _budget_message(client)
                return
            try:
                record = await handle(by_id[iid], client)
                await asyncio.to_thread(records.write, iid, record)
            except (BudgetExceeded, FatalLLMError) as exc:
                summary.stopped = summary.stopped or str(exc)
                return
            except Exception as exc:  # noqa: BLE001 - a bug: no new item starts; re-raised once those in flight end
                summary.stopped = summary.stopped or f"{iid}: {exc.__class__.__name__}: {exc}"
                bugs.append(exc)
                return
            summary.outcomes[outcome(record)] += 1
            why = reason(record)
            if why:
                summary.reasons[str(why)] += 1
            bar.update(1)
            bar.set_postfix({k: v for k, v in summary.outcomes.most_common(3)}, refresh=False)

    try:
        # twice as many workers as request slots: while one item is gated or written, another one's request
        # already holds the slot (the client's semaphore is what bounds requests in flight)
        await asyncio.gather(*(worker() for _ in range(min(2 * client.cfg.concurrency, max(1, len(pending))))))
    finally:
        bar.close()
        await client.aclose()
    summary.seconds = time.monotonic() - started
    log.info("%s", summary.line(desc))
    if bugs:
        raise bugs[0]
    if summary.stopped:
        log.warning("%s: stopped early: %s (%d items left without a record; rerun to continue)",
                    desc, summary.stopped, summary.left)
    return summary


def run_stage_items(ctx: StageContext, llm_cfg: LLMSection, items: Sequence[T],
                    handle: Callable[[T, LLMClient], Awaitable[dict[str, Any]]], *, item_id: Callable[[T], str],
                    noun: str = "items", **kwargs: Any) -> RunSummary:
    """A sharded stage's LLM work in one call: list this shard's pending items (none: return at once,
    without starting anything), start the embedded server if configured, give this shard its share of
    ``budget_usd`` (shards split it evenly), ``run_items`` over ``ctx.records()`` and ``ctx.shard``, and
    raise StageError when the run stopped early or an item failed without a record.
    ``kwargs`` go to run_items (``outcome``, ``reason``)."""
    name = ctx.stage
    records = ctx.records()
    ids = [item_id(i) for i in items]
    pending = records.pending(ids, ctx.shard)
    if not pending:
        total = len(ctx.shard.select(ids))
        return RunSummary(total=total, skipped=total)
    budget = llm_cfg.budget_usd / ctx.shard.count if llm_cfg.budget_usd else None
    with embedded_server(llm_cfg) as live:
        client = LLMClient(live, name=name, budget_usd=budget)
        summary = run_items(items, handle, records=records, client=client, item_id=item_id, shard=ctx.shard,
                            desc=name if ctx.shard.whole else f"{name} {ctx.shard}", pending=pending, **kwargs)
    if summary.stopped:
        raise StageError(f"{name}: {summary.stopped}; {summary.left} {noun} left without a record "
                         "(finished ones are kept; rerun to continue)")
    return summary


def _budget_message(client: LLMClient) -> str:
    try:
        client.check_budget()
    except BudgetExceeded as exc:
        return str(exc)
    return ""
