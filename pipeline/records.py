"""Per-item records: write-once results, resume, and shard selection (teacher, generate, judge).

An item's final result is stored under its own key as soon as it exists
(``<run.id>/<stage>/records/<item id>.json``). A rerun lists what exists and does only the rest, so a
kill -9, a retried pod or an Indexed Job never loses or repeats finished work. A shard takes the items
whose stable hash falls in its share, so shards never overlap whatever order the items come in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from pipeline.errors import ArtifactNotFound, PipelineError, StoreError
from pipeline.store import ArtifactStore

INPUTS = "_INPUTS"  # beside a stage's records: the fingerprint of the inputs they were made from
CLAIMS = "_claims"  # beside a stage's records: who is paying for which item now (Claims)
STALE = "_stale"  # beside a stage's records: records of earlier inputs, moved aside
CORRUPT = "_corrupt"  # beside a stage's records: records that could not be read, moved aside
FIRST_NAMES = 16  # RecordSet.started lists this many names: more than the runner's ``_`` names beside records
log = logging.getLogger("ielts_distill.records")
OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this process, as a claimant


def stable_hash(text: str, salt: str = "") -> int:
    """A 64-bit hash that is the same in every process, machine and Python version."""
    return int.from_bytes(hashlib.sha256(f"{salt}|{text}".encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise PipelineError(f"shard {self.index}/{self.count}: index must be in 0..count-1")

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """``"I/N"`` (0-based I), or None for the whole stage."""
        if not text:
            return cls()
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise PipelineError(f"--shard {text!r}: expected I/N, e.g. 0/4")
        return cls(int(m[1]), int(m[2]))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Shard:
        """The shard of a Kubernetes Indexed Job pod (JOB_COMPLETION_INDEX / JOB_COMPLETION_COUNT)."""
        env = os.environ if env is None else env
        index = env.get("JOB_COMPLETION_INDEX")
        if index is None:
            return cls()
        count = env.get("JOB_COMPLETION_COUNT")
        if count is None:
            raise PipelineError("JOB_COMPLETION_INDEX is set but JOB_COMPLETION_COUNT is not")
        try:
            return cls(int(index), int(count))
        except ValueError:
            raise PipelineError(f"JOB_COMPLETION_INDEX={index!r} / JOB_COMPLETION_COUNT={count!r}: expected "
                                "whole numbers") from None

    @property
    def whole(self) -> bool:
        return self.count == 1

    def owns(self, item_id: str) -> bool:
        return self.whole or stable_hash(item_id, "shard") % self.count == self.index

    def select(self, item_ids: Iterable[str]) -> list[str]:
        return [i for i in item_ids if self.owns(i)]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_KEY_CHARS = 230  # an escaped id: with its suffix a file name stays under 255 bytes, an S3 key under 1024


def safe_id(item_id: str) -> str:
    """An item id as one store key segment, one-to-one: ``A-Za-z0-9._=+-`` are kept and every other byte is
    percent-escaped, ``/``, ``\\`` and ``%`` too, so an id is never a folder, never another id's prefix
    folder and never leaves its namespace (``a``, ``a/b``, ``a\\..\\b``, ``..`` are all plain names);
    ``unsafe_id`` gives the id back. A leading ``_`` or ``.`` is escaped as well: ``_``-names beside the
    records (``_claims``, ``_stale``, ``_INPUTS``) are the runner's, and no key is hidden or ``.``/``..``.
    Empty ids, control characters and ids longer than MAX_KEY_CHARS escaped cannot be keys (ingest rejects
    such charts)."""
    if _CONTROL.search(item_id):
        raise PipelineError(f"item id {item_id!r} holds control characters and cannot be used as a record key")
    key = _escape(item_id)
    if not key or len(key) > MAX_KEY_CHARS:
        raise PipelineError(f"item id {item_id[:80]!r} cannot be used as a record key (empty, or longer than "
                            f"{MAX_KEY_CHARS} characters escaped)")
    return f"%{ord(key[0]):02X}{key[1:]}" if key[0] in "_." else key


def unsafe_id(key: str) -> str:
    """The item id of a key made by ``safe_id`` (or by its per-folder form before 2026-12-07)."""
    return unquote(key)


def item_key(folder: str, item_id: str, suffix: str) -> str:
    """The one place an item's key is built: ``<folder>/<safe_id(item_id)><suffix>``. Each kind of key
    (records, claims, images, ...) has a folder of its own, so kinds never meet and no id reaches another's."""
    return f"{folder.rstrip('/')}/{safe_id(item_id)}{suffix}"


def _escape(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", lambda m: "".join(f"%{b:02X}" for b in m[0].encode()), part)


def _legacy_key(folder: str, item_id: str) -> str | None:
    """Where a record of an id with ``/`` was kept before ids became one segment (one folder per part):
    still read, so records paid for then are not paid again."""
    parts = [_escape(p) for p in item_id.split("/")]
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        return None
    if parts[0].startswith("_"):
        parts[0] = "%5F" + parts[0][1:]
    return f"{folder}/{'/'.join(parts)}.json"


class RecordSet:
    """The records of one stage (or one sub-collection of it) under ``<prefix>/``. Names starting with ``_``
    right under the prefix are not records: ``_INPUTS``, ``_claims/`` (see Claims), ``_stale/``."""

    def __init__(self, store: ArtifactStore, prefix: str):
        self.store = store
        self.prefix = prefix.rstrip("/")

    def key(self, item_id: str) -> str:
        return item_key(self.prefix, item_id, ".json")

    def _record_keys(self) -> list[str]:
        start = len(self.prefix) + 1
        return [k for k in self.store.list(self.prefix + "/") if k.endswith(".json") and k[start] != "_"]

    def done_ids(self) -> set[str]:
        """Ids of the records that exist (one listing call, cheap for thousands of items)."""
        start = len(self.prefix) + 1
        return {unsafe_id(k[start:-5]) for k in self._record_keys()}

    def pending(self, item_ids: Iterable[str], shard: Shard = Shard()) -> list[str]:
        """Items this shard owns that have no record yet, in the given order."""
        done = self.done_ids()
        return [i for i in shard.select(item_ids) if i not in done]

    def exists(self, item_id: str) -> bool:
        """A record written now (records of the old per-folder layout are found by ``done_ids``/``pending``)."""
        return self.store.exists(self.key(item_id))

    def write(self, item_id: str, record: dict[str, Any]) -> None:
        # one line: json's C encoder (an indented dump runs the pure-Python one, ~4x the CPU of a record)
        self.store.put_text(self.key(item_id), json.dumps(record, ensure_ascii=False) + "\n")

    def read(self, item_id: str) -> dict[str, Any]:
        """The item's record. A corrupt one (not a JSON object: a cut write, a stray edit) is moved aside to
        ``<prefix>/_corrupt/`` with a warning, and StoreError says to rerun: the rerun redoes that item."""
        key = self.key(item_id)
        try:
            data = self.store.get_bytes(key)
        except ArtifactNotFound:
            if (legacy := _legacy_key(self.prefix, item_id)) is None or not self.store.exists(legacy):
                raise
            key, data = legacy, self.store.get_bytes(legacy)
        try:
            record = json.loads(data)
            if isinstance(record, dict):
                return record
            why = f"a JSON {type(record).__name__}, not an object"
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            why = f"not valid JSON: {exc.__class__.__name__}"
        aside = item_key(f"{self.prefix}/{CORRUPT}", item_id, time.strftime(".%Y%m%dT%H%M%SZ", time.gmtime()))
        self.store.put_bytes(aside, data)
        self.store.delete(key)
        log.warning("record of %s was corrupt (%s): moved to %s", item_id, why, self.store.url(aside))
        raise StoreError(f"record of {item_id!r} was corrupt ({why}): moved to {self.store.url(aside)}; "
                         "rerun the stage to redo that item")

    def read_all(self, item_ids: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
        """Records in sorted key order (or in the order of ``item_ids``)."""
        if item_ids is None:
            start = len(self.prefix) + 1
            for key in self._record_keys():
                yield self.read(unsafe_id(key[start:-5]))
        elif self.store.quick:  # local files: threads would only add hand-offs
            yield from map(self.read, item_ids)
        else:  # many small GETs: in parallel, results in order
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=16) as pool:
                yield from pool.map(self.read, list(item_ids))

    def count(self) -> int:
        return len(self.done_ids())

    def started(self) -> bool:
        """Whether any record exists (``count() > 0``) from one short listing, not a listing of them all: of
        the names right under the prefix only the runner's few ``_`` names are not records (a folder not
        named ``_`` holds records of the old per-folder layout)."""
        names = self.store.children(self.prefix + "/", limit=FIRST_NAMES)
        start = len(self.prefix) + 1
        if any(n[start] != "_" and (n.endswith(".json") or n.endswith("/") and any(self.store.list(n, limit=1)))
               for n in names):  # (an emptied folder may still be listed: SeaweedFS)
            return True
        return len(names) == FIRST_NAMES and self.count() > 0  # more non-records than the runner makes

    def keep_if_inputs(self, fingerprint: str) -> int:
        """Records are results *of some inputs* (adapters, essays): when the stage's inputs changed since
        the records were written, they are stale. Compare ``fingerprint`` with the one stored beside the
        records; on a change move the records aside to ``<prefix>/_stale/<UTC time>/`` (never deleted: they
        were paid for) and store the new fingerprint. Returns how many were moved."""
        key = f"{self.prefix}/{INPUTS}"
        if self.store.exists(key) and self.store.get_text(key).strip() == fingerprint:
            return 0
        stale = self._record_keys() if self.store.exists(key) else []
        if stale:
            aside = f"{self.prefix}/{STALE}/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
            self._move(stale, self.prefix, aside)
            self.store.put_text(f"{aside}/{INPUTS}", self.store.get_text(key))
            self.aside = aside
        self.store.put_text(key, fingerprint + "\n")
        return len(stale)

    aside: str | None = None  # where keep_if_inputs last moved stale records

    def restore_stale(self) -> int:
        """Undo the last ``keep_if_inputs`` move when no new record was written since (the run failed before
        replacing any): the records and their fingerprint go back. Returns how many records came back."""
        if not self.aside or self._record_keys():
            return 0
        back = [k for k in self.store.list(self.aside + "/") if k.endswith(".json")]
        self._move(back, self.aside, self.prefix)
        self.store.put_text(f"{self.prefix}/{INPUTS}", self.store.get_text(f"{self.aside}/{INPUTS}"))
        self.store.delete(f"{self.aside}/{INPUTS}")
        self.aside = None
        return len(back)

    def _move(self, keys: list[str], src: str, dst: str) -> None:
        """Copy then delete (stores have no rename); a crash in between leaves a copy, never nothing."""
        for k in keys:
            self.store.put_bytes(f"{dst}/{k[len(src) + 1:]}", self.store.get_bytes(k))
        for k in keys:
            self.store.delete(k)


class Claims:
    """One payer per item, also across processes that do not know of each other (a lost-but-alive pod
    and its replacement): before paying for an item, a worker claims it by creating
    ``<records>/_claims/<key>`` with a write that fails when the key exists (S3 ``If-None-Match: *``, an
    exclusive create locally). A claim holds an expiry time (now + ``lease_s``) that its owner renews while
    it works (``renew``); an expired claim (its owner died) is taken over with a conditional replace, so
    exactly one of several contenders wins it."""

    def __init__(self, records: RecordSet, lease_s: float = 120.0, owner: str | None = None):
        self.records, self.lease_s = records, lease_s
        self.owner = owner or OWNER  # a rerun in the same process takes its own leftover claims back
        self.held: dict[str, bytes] = {}  # item id -> our claim's current body

    def key(self, item_id: str) -> str:
        return item_key(f"{self.records.prefix}/{CLAIMS}", item_id, ".claim")

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.lease_s}).encode()

    def take(self, item_id: str) -> bool:
        """Claim the item; False when a live claim of another owner holds it."""
        store, key, body = self.records.store, self.key(item_id), self._body()
        if store.create(key, body):
            self.held[item_id] = body
            return True
        try:
            current = store.get_bytes(key)
        except ArtifactNotFound:  # released meanwhile
            return self.take(item_id)
        try:
            info = json.loads(current)
            owner, expires = info["owner"], float(info["expires"])
        except (ValueError, KeyError, TypeError):  # unreadable (a cut write): as good as expired, taken over
            owner, expires = "", 0.0  # by the conditional replace, which fails if it was only being written
        if owner == self.owner:
            self.held[item_id] = current
            return True
        if (expires > time.time() and _alive(owner)) or not store.replace_if(key, body, current):
            return False
        self.held[item_id] = body
        return True

    def renew(self) -> None:
        """Push the expiry of every held claim forward (call every ``lease_s / 3``)."""
        store = self.records.store
        for item_id, current in list(self.held.items()):
            body = self._body()
            if store.replace_if(self.key(item_id), body, current) and item_id in self.held:
                self.held[item_id] = body

    def expires(self, item_id: str) -> float:
        """When our claim on the item runs out (time.time(); 0 when we hold none), by the body we wrote."""
        body = self.held.get(item_id)
        return float(json.loads(body)["expires"]) if body else 0.0

    def confirm(self, item_id: str) -> bool:
        """Renew this one claim now: False (and no longer held) when it is not ours on the store any more."""
        current, body = self.held.get(item_id), self._body()
        if current is not None and self.records.store.replace_if(self.key(item_id), body, current):
            self.held[item_id] = body
            return True
        self.held.pop(item_id, None)
        return False

    def forget(self, item_id: str) -> None:
        """Drop a claim another process took over, leaving its key alone."""
        self.held.pop(item_id, None)

    def release(self, item_id: str) -> None:
        if self.held.pop(item_id, None) is not None:
            self.records.store.delete(self.key(item_id))


def _alive(owner: str) -> bool:
    """False when the claim's owner was a process on this host that is gone (a rerun after kill -9 need
    not wait for its lease); True otherwise (another host: only the lease tells)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def fingerprint(*parts: Any) -> str:
    """A stable digest of JSON-able inputs (for ``RecordSet.keep_if_inputs``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
