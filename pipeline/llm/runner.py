"""The item runner: "pending items" in, "one final record per item" out (teacher and judge).

``run_items`` drives an async handler over the items without a record (``_ItemRun``: claim, answer, save);
``pipeline.items.run_stage_items`` is the same for one stage invocation. A library: it knows records, a
store and an LLM client, no stage machinery.
"""

from __future__ import annotations

import asyncio
import gc
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

from pipeline.errors import ArtifactNotFound, PipelineError, StoreError
from pipeline.llm.client import (
    BEFORE_SEND,
    BudgetExceeded,
    FatalLLMError,
    LLMClient,
    TransientLLMError,
    Usage,
)
from pipeline.records import Claims, RecordSet, Shard
from pipeline.redact import redact_obj
from pipeline.store import blocking, pool_size_for

log = logging.getLogger("ielts_distill.llm")
T = TypeVar("T")
GC_YOUNG = 7000  # allocations between collections of the youngest generation during a run (Python's default: 700)


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
      record, ``summary.transient``). BudgetExceeded and FatalLLMError (also 401/402/403 and account-level
      answers) stop new items; the ones in flight end; the rest stay pending. Any other exception is a bug in
      the handler: no new item starts, the ones in flight end and are recorded, and the exception propagates
      with its traceback.
    - The store going away never costs a paid answer: a failed store call pauses new items and is retried
      with back-off for up to ``outage_s`` seconds; answers waiting to be written are kept in memory and in
      a local spill file (``spill_path``) that the next run stores first. If the store stays down the run
      stops (``summary.stopped``). A store call that keeps failing while the store answers its probe (a
      full disk, a refused key) fails after ``_Store.TRIES`` tries: the item stays pending, the run stops.
    - The claim is checked right before each request is sent (``client.BEFORE_SEND``): an item whose lease
      ran out while this process was frozen, and that another process took, is never paid for here.
    - Records are stored with the environment's secret values masked (pipeline.redact).
    - Concurrency: at most ``client.cfg.concurrency`` requests in flight (the client's semaphore); up to
      twice as many items are in progress so that gating and writing never leave a request slot idle.
      Store calls run in a thread pool of ``pool_size_for(concurrency)`` threads (the store's pool is grown
      to match: ``ensure_pool``).
    - Progress: a tqdm bar (rate, ETA) with outcome counts; at the end one summary line is logged.
    - Garbage collection during the run: the objects that exist at its start are frozen (``gc.freeze``) and
      the youngest generation is collected every GC_YOUNG allocations; both are undone at the end.
    - Returns a RunSummary. Runs its own event loop and closes ``client`` at the end: one client per call.
    """
    run = _ItemRun({item_id(i): i for i in items}, handle, records, client, shard, desc, outcome, reason,
                   outage_s, lease_s)
    return asyncio.run(run.run(pending))


class StoreDown(PipelineError):
    """The store stayed unreachable for ``outage_s``: stop before paying for more."""


class StoreFailing(PipelineError):
    """A store call kept failing while the store answered its probe (a full disk, a key it refuses): the item
    stays pending and the run stops, instead of retrying it forever."""


class ClaimLost(PipelineError):
    """Another process holds the item now (this one was frozen past its lease): no request is sent for it."""


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
    """The runner's store calls. A failed call is retried at most TRIES times: between tries the store is
    probed; while the probe fails too (an outage) new items pause (``ok``) and the probe is retried with
    back-off until the store answers, or ``outage_s`` passed (then StoreDown). A call that fails while the
    probe succeeds fails after TRIES tries (StoreFailing). Answers not yet written wait in ``unsaved`` and in
    the spill file."""

    TRIES = 3
    PAUSE_S = 0.2  # before the first probe: a blip passes

    def __init__(self, records: RecordSet, outage_s: float):
        self.records, self.outage_s = records, outage_s
        self.ok = asyncio.Event()
        self.ok.set()
        self.lock = asyncio.Lock()
        self.down: str | None = None
        self.unsaved: dict[str, dict[str, Any]] = {}
        self.spill, self.spilled = spill_path(records), False
        self.recovered = 0.0  # time.monotonic() of the last probe that succeeded

    async def call(self, fn: Callable[..., Any], *args: Any, what: str = "") -> Any:
        for tries in range(1, self.TRIES + 1):
            failed = time.monotonic()
            try:
                return await blocking(self.records.store, fn, *args)
            except ArtifactNotFound:
                raise
            except StoreError as exc:
                await self.retry_or_fail(exc, failed, tries, what)

    async def save(self, iid: str, record: dict[str, Any], release: Callable[[], None]) -> None:
        """Write the record, then ``release`` (the item's claim) in the same thread hop. A failed write keeps
        the paid answer in the spill file first."""
        def write() -> None:
            self.records.write(iid, record)
            self.unsaved.pop(iid, None)
            release()

        for tries in range(1, self.TRIES + 1):
            failed = time.monotonic()
            try:
                await blocking(self.records.store, write)
                break
            except StoreError as exc:
                if iid not in self.unsaved:
                    self._keep(iid, record)
                await self.retry_or_fail(exc, failed, tries, f"{iid}: ", kept=True)
        if self.spilled and not self.unsaved:
            self.spill.unlink(missing_ok=True)
            self.spilled = False

    def _keep(self, iid: str, record: dict[str, Any]) -> None:
        self.unsaved[iid] = record
        self.spilled = True
        try:
            self.spill.parent.mkdir(parents=True, exist_ok=True)
            with self.spill.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"id": iid, "record": record}, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:  # the spill's disk is full too: the answer lives only in memory now
            log.warning("%s: cannot keep the paid answer in %s (%s)", iid, self.spill, exc.strerror)

    async def retry_or_fail(self, exc: StoreError, failed: float, tries: int, what: str, kept: bool = False) -> None:
        if tries >= self.TRIES:
            where = f"; the paid answer is kept in {self.spill} (the next run stores it)" if kept else ""
            raise StoreFailing(f"{what}the store keeps failing while it answers ({tries} tries): {exc}{where}")
        await self.wait(exc, failed)

    async def wait(self, exc: StoreError, failed: float) -> None:
        """Return once the store answers its probe (at once when it did since ``failed``); StoreDown when
        it stays down for ``outage_s``."""
        async with self.lock:
            if self.down:
                raise StoreDown(self.down)
            if self.recovered > failed:
                return
            await asyncio.sleep(self.PAUSE_S)
            if await self._probe():
                return
            await self._outage(exc)

    async def _outage(self, exc: StoreError) -> None:
        self.ok.clear()
        log.warning("store unreachable (%s): no new requests until it answers (up to %.0f s)", exc, self.outage_s)
        deadline, delay = time.monotonic() + self.outage_s, self.PAUSE_S
        while True:
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            if await self._probe():
                break
            if time.monotonic() >= deadline:
                kept = f"; {len(self.unsaved)} paid answers kept in {self.spill} (the next run stores " \
                       "them)" if self.unsaved else ""
                self.down = f"store unreachable for {self.outage_s:.0f} s ({exc}){kept}"
                self.ok.set()  # wake the paused workers: they see the stop
                raise StoreDown(self.down)
            delay = min(delay * 2, 5.0)
        log.warning("store reachable again: continuing")
        self.ok.set()

    async def _probe(self) -> bool:
        try:
            await asyncio.to_thread(self.records.store.exists, f"{self.records.prefix}/_probe")
        except StoreError:
            return False
        self.recovered = time.monotonic()
        return True


class _ItemRun:
    """One ``run_items`` call: workers take pending items from a queue and for each claim it, get its record
    from the handler and save it; a heartbeat renews the claims; ``summary`` counts what happened."""

    def __init__(self, by_id: dict[str, Any], handle: Callable[[Any, LLMClient], Awaitable[dict[str, Any]]],
                 records: RecordSet, client: LLMClient, shard: Shard, desc: str, outcome: Callable[[dict], str],
                 reason: Callable[[dict], str | None], outage_s: float, lease_s: float):
        self.by_id, self.handle, self.records, self.client, self.shard = by_id, handle, records, client, shard
        self.desc, self.outcome, self.reason, self.outage_s, self.lease_s = desc, outcome, reason, outage_s, lease_s
        self.claims = Claims(records, lease_s)
        self.queue: deque[tuple[str, float]] = deque()  # (id, not before: monotonic time)
        self.bugs: list[BaseException] = []

    async def run(self, pending: list[str] | None) -> RunSummary:
        from tqdm import tqdm

        concurrency = self.client.cfg.concurrency
        self.records.store.ensure_pool(pool_size_for(concurrency))  # before any store call in a thread
        if pending is None:
            pending = await asyncio.to_thread(self.records.pending, list(self.by_id), self.shard)
        total = len(self.shard.select(list(self.by_id)))
        self.summary = RunSummary(total=total, skipped=total - len(pending), usage=self.client.usage)
        self.queue.extend((i, 0.0) for i in pending)
        self.store = _Store(self.records, self.outage_s)
        self.bar = tqdm(total=len(pending), desc=self.desc, unit="item", dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.5 if sys.stderr.isatty() else 10.0, disable=not pending)
        # store calls run in threads: one per worker (the default pool has cpu + 4, which an S3 store's
        # round trips would make the bottleneck of a pod with few cores); the store's pool has as many connections
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(
            max_workers=pool_size_for(concurrency), thread_name_prefix="store"))
        started, beat = time.monotonic(), asyncio.create_task(self.heartbeat())
        # what exists now (modules, the items, the config) lives through the run: frozen, a full collection
        # scans only what the run makes (one over the ~110k objects of a teacher process took ~0.14 s of CPU);
        # and the youngest generation is collected every GC_YOUNG allocations, not 700: the items in flight
        # (frames, answers, records) were scanned again and again (GC 0.07 -> 0.03 s for 300 requests at 64)
        gc.freeze()
        thresholds = gc.get_threshold()
        gc.set_threshold(max(GC_YOUNG, thresholds[0]), *thresholds[1:])
        try:
            # twice as many workers as request slots: while one item is gated or written, another one's
            # request already holds the slot (the client's semaphore is what bounds requests in flight)
            await asyncio.gather(*(self.worker() for _ in range(min(2 * concurrency, max(1, len(pending))))))
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            beat.cancel()
            self.bar.close()
            await self.client.aclose()
        return self.finish(time.monotonic() - started)

    def finish(self, seconds: float) -> RunSummary:
        summary = self.summary
        summary.seconds = seconds
        log.info("%s", summary.line(self.desc))
        if self.bugs:
            raise self.bugs[0]
        if summary.stopped:
            log.warning("%s: stopped early: %s (%d items left without a record; rerun to continue)",
                        self.desc, summary.stopped, summary.left)
        return summary

    async def worker(self) -> None:
        summary = self.summary
        while summary.stopped is None and self.queue:
            await self.store.ok.wait()
            if summary.stopped is not None or not self.queue:
                return
            iid, not_before = self.queue.popleft()
            if not_before > time.monotonic():
                await asyncio.sleep(min(not_before - time.monotonic(), 1.0))
                if not_before > time.monotonic():
                    self.queue.append((iid, not_before))
                    continue
            if not self.client.budget_left():
                summary.stopped = _budget_message(self.client)
                return
            try:
                await self.one(iid)
            except (BudgetExceeded, FatalLLMError, StoreDown, StoreFailing) as exc:
                summary.stopped = summary.stopped or str(exc)
                return
            except Exception as exc:
                summary.stopped = summary.stopped or f"{iid}: {exc.__class__.__name__}: {exc}"
                self.bugs.append(exc)
                return

    async def one(self, iid: str) -> None:
        """Claim the item, get its record, save it; or leave it to the process that holds it."""
        got = await self.store.call(self.take, iid, what=f"{iid}: ")
        if not got:
            if got is None:
                self.finished(None)
            else:
                self.look_again(iid)
            return
        try:
            record = await self.answer(iid)
        except ClaimLost:
            self.claims.forget(iid)  # not ours any more: its record appears, or its claim expires again
            self.look_again(iid)
            return
        except TransientLLMError as exc:
            self.summary.transient[iid] = str(exc)
            await _quietly(self.store.call(self.claims.release, iid))
            return
        except BaseException:
            await _quietly(self.store.call(self.claims.release, iid))
            raise
        await self.store.save(iid, redact_obj(record), release=lambda: _release_quietly(self.claims, iid))
        self.finished(record)

    def take(self, iid: str) -> bool | None:
        """True: ours to pay for; None: already recorded (by another process); False: held by another.
        One thread hop for the claim and the record check (store calls are file or HTTP I/O)."""
        if not self.claims.take(iid):
            return None if self.records.exists(iid) else False
        if self.records.exists(iid):  # recorded between our listing and our claim
            self.claims.release(iid)
            return None
        return True

    def look_again(self, iid: str) -> None:
        """Later: its record appears, or its claim expires and we take it over."""
        self.queue.append((iid, time.monotonic() + min(self.lease_s / 4, 5.0)))

    async def answer(self, iid: str) -> dict[str, Any]:
        """The handler's record; every request it sends first checks that the claim is still ours. A store
        read of the handler (an image) that fails is retried like any store call."""
        BEFORE_SEND.set(lambda: self.check_claim(iid))
        tries = 0
        try:
            while True:
                failed, tries = time.monotonic(), tries + 1
                try:
                    return await self.handle(self.by_id[iid], self.client)
                except StoreError as exc:
                    if isinstance(exc, ArtifactNotFound):
                        raise
                    await self.store.retry_or_fail(exc, failed, tries, f"{iid}: ")
        finally:
            BEFORE_SEND.set(None)

    async def check_claim(self, iid: str) -> None:
        """ClaimLost unless the claim is ours: with time to spare by our own clock (renewed every third of the
        lease), else confirmed on the store by renewing it (after a freeze: it fails once another took it)."""
        if self.claims.expires(iid) - time.time() > self.lease_s / 3:
            return
        if not await self.store.call(self.claims.confirm, iid, what=f"{iid}: "):
            raise ClaimLost(f"{iid}: its claim expired and another process holds it now")

    def finished(self, record: dict[str, Any] | None) -> None:
        summary = self.summary
        if record is None:
            summary.skipped += 1  # another process recorded it
        else:
            summary.outcomes[self.outcome(record)] += 1
            why = self.reason(record)
            if why:
                summary.reasons[str(why)] += 1
        self.bar.update(1)
        self.bar.set_postfix({k: v for k, v in summary.outcomes.most_common(3)}, refresh=False)

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            await _quietly(asyncio.to_thread(self.claims.renew))


def _release_quietly(claims: Claims, iid: str) -> None:
    try:
        claims.release(iid)
    except StoreError:
        pass  # a claim left behind only expires


async def _quietly(awaitable: Awaitable[Any]) -> None:
    """Best effort (releasing a claim, renewing leases): a claim left behind only expires."""
    try:
        await awaitable
    except (StoreError, StoreDown, StoreFailing):
        pass


def _budget_message(client: LLMClient) -> str:
    try:
        client.check_budget()
    except BudgetExceeded as exc:
        return str(exc)
    return ""
