"""The item runner: "pending items" in, "one final record per item" out (teacher and judge).

``run_items`` drives an async handler over the items without a record; ``run_stage_items`` is the same for
one stage invocation (shard, budget share, embedded server) and turns an early stop into a StageError.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config import LLMSection
from pipeline.context import StageContext
from pipeline.errors import ArtifactNotFound, PipelineError, StageError, StoreError
from pipeline.llm.client import (
    BudgetExceeded,
    FatalLLMError,
    LLMClient,
    TransientLLMError,
    Usage,
)
from pipeline.llm.server import embedded_server
from pipeline.records import Claims, RecordSet, Shard
from pipeline.redact import redact_obj
from pipeline.store import blocking, pool_size_for

log = logging.getLogger("ielts_distill.llm")
T = TypeVar("T")


@dataclass
class RunSummary:
    total: int  # items given (this shard's share)
    skipped: int  # already had a record
    outcomes: Counter = field(default_factory=Counter)  # outcome -> count, for records written now
    reasons: Counter = field(default_factory=Counter)  # reason key -> count, for records with a reason
    stopped: str | None = None  # why the run stopped early (budget, fatal endpoint error, store down)
    transient: dict[str, str] = field(default_factory=dict)  # item -> transient error: pending, no record
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
        extra += f"; {u.timeouts} timed out (possibly billed)" if u.timeouts else ""
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
              reason: Callable[[dict], str | None] = _default_reason, pending: list[str] | None = None,
              outage_s: float = 120.0, lease_s: float = 120.0) -> RunSummary:
    """Process every item of this shard that has no record yet; write one record per item when final.

    - ``items``: all items of the stage (any order); ``item_id(item)`` is its record id (may contain ``/``).
    - ``records.pending(ids, shard)`` decides what runs (or ``pending``, when the caller has just listed
      it): items with a record are never requested again.
    - One payer per item: each item is claimed (``records.Claims``, lease ``lease_s``) before it is paid
      for. An item another live process holds is looked at again later: done when its record appears, taken
      over when its claim expires; so two processes on one run split the work and both end when all is done.
    - ``handle(item, client) -> record``: an async function making its requests with ``client.chat`` and
      returning the item's final record (a JSON-able dict). It should turn ``LLMError`` (a definite 4xx)
      into a record that says why; it lets ``TransientLLMError`` through: that item stays pending (no
      record, ``summary.transient``). BudgetExceeded and FatalLLMError stop new items; the ones in flight
      end; the rest stay pending. Any other exception is a bug in the handler: no new item starts, the ones
      in flight end and are recorded, and the exception propagates with its traceback.
    - The store going away never costs a paid answer: a failed store call pauses new items and is retried
      with back-off for up to ``outage_s`` seconds; answers waiting to be written are kept in memory and in
      a local spill file (``spill_path``) that the next run stores first. If the store stays down the run
      stops (``summary.stopped``).
    - Records are stored with the environment's secret values masked (pipeline.redact).
    - Concurrency: at most ``client.cfg.concurrency`` requests in flight (the client's semaphore); up to
      twice as many items are in progress so that gating and writing never leave a request slot idle.
      Store calls run in a thread pool of ``pool_size_for(concurrency)`` threads (the store's pool is grown
      to match: ``ensure_pool``).
    - Progress: a tqdm bar (rate, ETA) with outcome counts; at the end one summary line is logged.
    - Returns a RunSummary. Runs its own event loop and closes ``client`` at the end: one client per call.
    """
    return asyncio.run(_run_items(items, handle, records, client, item_id, shard, desc, outcome, reason, pending,
                                  outage_s, lease_s))


class StoreDown(PipelineError):
    """The store stayed unreachable for ``outage_s``: stop before paying for more."""


def spill_path(records: RecordSet, pid: int | str | None = None) -> Path:
    """The local file where answers wait while the store is down: ``$IELTS_SPILL_DIR`` (default
    ``~/.cache/ielts-distill/spill``), one file per records folder and process."""
    root = Path(os.environ.get("IELTS_SPILL_DIR") or Path.home() / ".cache" / "ielts-distill" / "spill")
    tag = hashlib.sha256(f"{records.store.uri}|{records.prefix}".encode()).hexdigest()[:16]
    return root / f"{tag}-{os.getpid() if pid is None else pid}.jsonl"


def store_spilled(records: RecordSet) -> int:
    """Store the answers an earlier run could not (its spill files); returns how many were written."""
    written = 0
    for path in sorted(spill_path(records, "*").parent.glob(spill_path(records, "*").name)):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed process may be cut
            if not records.exists(row["id"]):
                records.write(row["id"], row["record"])
                written += 1
        path.unlink()
    if written:
        log.warning("%s: stored %d answers kept in a spill file by an earlier run (the store was down)",
                    records.prefix, written)
    return written


class _Store:
    """The runner's store calls: a failure pauses new items (``ok``) and retries with back-off until the
    store answers again, or ``outage_s`` passed (then StoreDown). Records not yet written wait in ``unsaved``
    and in the spill file."""

    def __init__(self, records: RecordSet, outage_s: float):
        self.records, self.outage_s = records, outage_s
        self.ok = asyncio.Event()
        self.ok.set()
        self.lock = asyncio.Lock()
        self.down: str | None = None
        self.unsaved: dict[str, dict[str, Any]] = {}
        self.spill = spill_path(records)
        self.recovered = 0.0  # time.monotonic() of the last recovery

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        while True:
            failed = time.monotonic()
            try:
                return await blocking(self.records.store, fn, *args)
            except ArtifactNotFound:
                raise
            except StoreError as exc:
                await self.wait(exc, failed)

    async def save(self, iid: str, record: dict[str, Any], release: Callable[[], None] | None = None) -> None:
        """Write the record; then ``release`` (the item's claim) in the same thread hop."""
        failed = time.monotonic()

        def write() -> None:
            self.records.write(iid, record)
            if release is not None:
                release()

        try:
            await blocking(self.records.store, write)
            return
        except StoreError as exc:
            self.unsaved[iid] = record
            self.spill.parent.mkdir(parents=True, exist_ok=True)
            with self.spill.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"id": iid, "record": record}, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            await self.wait(exc, failed)
            if release is not None:
                await blocking(self.records.store, release)

    async def wait(self, exc: StoreError, failed: float) -> None:
        """Return once the store works again (every unsaved record written); StoreDown when it stays down."""
        async with self.lock:
            if self.down:
                raise StoreDown(self.down)
            if self.recovered > failed and not self.unsaved:
                return  # another worker saw it recover meanwhile
            self.ok.clear()
            log.warning("store unreachable (%s): no new requests until it answers (up to %.0f s)", exc,
                        self.outage_s)
            deadline, delay = time.monotonic() + self.outage_s, 0.2
            while True:
                await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                try:
                    await asyncio.to_thread(self._flush)
                    break
                except StoreError as again:
                    exc = again
                if time.monotonic() >= deadline:
                    kept = f"; {len(self.unsaved)} paid answers kept in {self.spill} (the next run stores " \
                           "them)" if self.unsaved else ""
                    self.down = f"store unreachable for {self.outage_s:.0f} s ({exc}){kept}"
                    self.ok.set()  # wake the paused workers: they see the stop
                    raise StoreDown(self.down)
                delay = min(delay * 2, 5.0)
            self.recovered = time.monotonic()
            log.warning("store reachable again: continuing")
            self.ok.set()

    def _flush(self) -> None:
        self.records.store.exists(self.records.key("_probe"))  # raises StoreError while down
        for iid, record in list(self.unsaved.items()):
            self.records.write(iid, record)
            del self.unsaved[iid]
        self.spill.unlink(missing_ok=True)


async def _run_items(items, handle, records, client, item_id, shard, desc, outcome, reason, pending,
                     outage_s, lease_s) -> RunSummary:
    from tqdm import tqdm

    ids = [item_id(i) for i in items]
    by_id = dict(zip(ids, items))
    records.store.ensure_pool(pool_size_for(client.cfg.concurrency))  # before any store call in a thread
    if pending is None:
        pending = await asyncio.to_thread(records.pending, ids, shard)
    summary = RunSummary(total=len(shard.select(ids)), skipped=0, usage=client.usage)
    summary.skipped = summary.total - len(pending)
    started = time.monotonic()
    queue: deque[tuple[str, float]] = deque((i, 0.0) for i in pending)  # (id, not before: monotonic time)
    store, claims = _Store(records, outage_s), Claims(records, lease_s)
    bugs: list[BaseException] = []
    bar = tqdm(total=len(pending), desc=desc, unit="item", dynamic_ncols=True, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 10.0, disable=not pending)

    def finished(record: dict[str, Any] | None) -> None:
        if record is None:
            summary.skipped += 1  # another process recorded it
        else:
            summary.outcomes[outcome(record)] += 1
            why = reason(record)
            if why:
                summary.reasons[str(why)] += 1
        bar.update(1)
        bar.set_postfix({k: v for k, v in summary.outcomes.most_common(3)}, refresh=False)

    def take(iid: str) -> bool | None:
        """True: ours to pay for; None: already recorded (by another process); False: held by another.
        One thread hop for the claim and the record check (store calls are file or HTTP I/O)."""
        if not claims.take(iid):
            return None if records.exists(iid) else False
        if records.exists(iid):  # recorded between our listing and our claim
            claims.release(iid)
            return None
        return True

    async def claim(iid: str) -> bool | None:
        return await store.call(take, iid)

    async def one(iid: str) -> None:
        got = await claim(iid)
        if not got:
            if got is None:
                finished(None)
            else:  # look again later: its record appears, or its claim expires and we take it over
                queue.append((iid, time.monotonic() + min(lease_s / 4, 5.0)))
            return
        try:
            while True:
                failed = time.monotonic()
                try:
                    record = await handle(by_id[iid], client)
                    break
                except StoreError as exc:  # the handler read the store (an image) while it was down
                    if isinstance(exc, ArtifactNotFound):
                        raise
                    await store.wait(exc, failed)
        except TransientLLMError as exc:
            summary.transient[iid] = str(exc)
            await _quietly(store.call(claims.release, iid))
            return
        except BaseException:
            await _quietly(store.call(claims.release, iid))
            raise
        await store.save(iid, redact_obj(record), release=lambda: _release_quietly(claims, iid))
        finished(record)

    async def worker() -> None:
        while summary.stopped is None and queue:
            await store.ok.wait()
            if summary.stopped is not None or not queue:
                return
            iid, not_before = queue.popleft()
            if not_before > time.monotonic():
                await asyncio.sleep(min(not_before - time.monotonic(), 1.0))
                if not_before > time.monotonic():
                    queue.append((iid, not_before))
                    continue
            if not client.budget_left():
                summary.stopped = _budget_message(client)
                return
            try:
                await one(iid)
            except (BudgetExceeded, FatalLLMError, StoreDown) as exc:
                summary.stopped = summary.stopped or str(exc)
                return
            except Exception as exc:
                summary.stopped = summary.stopped or f"{iid}: {exc.__class__.__name__}: {exc}"
                bugs.append(exc)
                return

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(lease_s / 3)
            await _quietly(asyncio.to_thread(claims.renew))

    # store calls run in threads: one per worker (the default pool has cpu + 4, which an S3 store's
    # round trips would make the bottleneck of a pod with few cores); the store's pool has as many connections
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(
        max_workers=pool_size_for(client.cfg.concurrency), thread_name_prefix="store"))
    beat = asyncio.create_task(heartbeat())
    try:
        # twice as many workers as request slots: while one item is gated or written, another one's request
        # already holds the slot (the client's semaphore is what bounds requests in flight)
        await asyncio.gather(*(worker() for _ in range(min(2 * client.cfg.concurrency, max(1, len(pending))))))
    finally:
        beat.cancel()
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


def _release_quietly(claims: Claims, iid: str) -> None:
    try:
        claims.release(iid)
    except StoreError:
        pass  # a claim left behind only expires


async def _quietly(awaitable: Awaitable[Any]) -> None:
    """Best effort (releasing a claim, renewing leases): a claim left behind only expires."""
    try:
        await awaitable
    except (StoreError, StoreDown):
        pass


def run_stage_items(ctx: StageContext, llm_cfg: LLMSection, items: Sequence[T],
                    handle: Callable[[T, LLMClient], Awaitable[dict[str, Any]]], *, item_id: Callable[[T], str],
                    noun: str = "items", inputs: str | None = None, **kwargs: Any) -> RunSummary:
    """A sharded stage's LLM work in one call: store what an earlier run spilled, set aside records made from
    other ``inputs`` (a fingerprint, see RecordSet.keep_if_inputs; they come back if this run fails before
    writing a new record), list this shard's pending items (none: return at once, without starting
    anything), start the embedded server if configured, give this shard its share of ``budget_usd`` and of
    ``requests_per_minute`` (shards run at once and split both evenly), ``run_items`` over ``ctx.records()``
    and ``ctx.shard``, and raise StageError when the run stopped early or items stay pending after transient errors ("N items pending: rerun").
    ``kwargs`` go to run_items (``outcome``, ``reason``)."""
    records = ctx.records()
    store_spilled(records)
    stale = records.keep_if_inputs(inputs) if inputs is not None else 0
    if stale:
        log.warning("%s: inputs changed since the last run: %d stale %s moved to %s", ctx.stage, stale, noun,
                    ctx.store.url(records.aside or ""))
    try:
        return _run_stage_items(ctx, llm_cfg, items, handle, records, item_id, noun, **kwargs)
    except BaseException:
        try:
            if stale and records.restore_stale():
                log.warning("%s: no new record written: the %d set-aside %s are back", ctx.stage, stale, noun)
        except StoreError:
            pass  # the store is down: they stay under _stale/
        raise


def _run_stage_items(ctx: StageContext, llm_cfg: LLMSection, items: Sequence[T], handle, records: RecordSet,
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


def _budget_message(client: LLMClient) -> str:
    try:
        client.check_budget()
    except BudgetExceeded as exc:
        return str(exc)
    return ""
