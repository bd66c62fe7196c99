"""Per-item records: write-once results, resume, and shard selection (teacher, generate, judge).

An item's final result is stored under its own key as soon as it exists
(``<run.id>/<stage>/records/<item id>.json``). A rerun lists what exists and does only the rest, so a
kill -9, a retried pod or an Indexed Job never loses or repeats finished work. A shard takes the items
whose stable hash falls in its share, so shards never overlap whatever order the items come in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError
from pipeline.store import ArtifactStore

_SAFE = re.compile(r"[^A-Za-z0-9._=+-]")
INPUTS = "_INPUTS"  # beside a stage's records: the fingerprint of the inputs they were made from


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
    def parse(cls, text: str | None) -> "Shard":
        """``"I/N"`` (0-based I), or None for the whole stage."""
        if not text:
            return cls()
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise PipelineError(f"--shard {text!r}: expected I/N, e.g. 0/4")
        return cls(int(m[1]), int(m[2]))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Shard":
        """The shard of a Kubernetes Indexed Job pod (JOB_COMPLETION_INDEX / JOB_COMPLETION_COUNT)."""
        env = os.environ if env is None else env
        index = env.get("JOB_COMPLETION_INDEX")
        if index is None:
            return cls()
        count = env.get("JOB_COMPLETION_COUNT")
        if count is None:
            raise PipelineError("JOB_COMPLETION_INDEX is set but JOB_COMPLETION_COUNT is not")
        return cls(int(index), int(count))

    @property
    def whole(self) -> bool:
        return self.count == 1

    def owns(self, item_id: str) -> bool:
        return self.whole or stable_hash(item_id, "shard") % self.count == self.index

    def select(self, item_ids: Iterable[str]) -> list[str]:
        return [i for i in item_ids if self.owns(i)]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def safe_id(item_id: str) -> str:
    """A store-key-safe form of an item id (ids with ``/`` become nested folders)."""
    parts = [_SAFE.sub("_", p) for p in item_id.split("/")]
    if any(p in ("", ".", "..") for p in parts):
        raise PipelineError(f"item id {item_id!r} cannot be used as a record key")
    return "/".join(parts)


class RecordSet:
    """The records of one stage (or one sub-collection of it) under ``<prefix>/``."""

    def __init__(self, store: ArtifactStore, prefix: str):
        self.store = store
        self.prefix = prefix.rstrip("/")

    def key(self, item_id: str) -> str:
        return f"{self.prefix}/{safe_id(item_id)}.json"

    def done_ids(self) -> set[str]:
        """Ids of the records that exist (one listing call, cheap for thousands of items)."""
        start = len(self.prefix) + 1
        return {k[start:-5] for k in self.store.list(self.prefix + "/") if k.endswith(".json")}

    def pending(self, item_ids: Iterable[str], shard: Shard = Shard()) -> list[str]:
        """Items this shard owns that have no record yet, in the given order."""
        done = self.done_ids()
        return [i for i in shard.select(item_ids) if safe_id(i) not in done]

    def write(self, item_id: str, record: dict[str, Any]) -> None:
        self.store.put_json(self.key(item_id), record)

    def read(self, item_id: str) -> dict[str, Any]:
        return self.store.get_json(self.key(item_id))

    def read_all(self, item_ids: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
        """Records in sorted key order (or in the order of ``item_ids``)."""
        if item_ids is None:
            for key in self.store.list(self.prefix + "/"):
                if key.endswith(".json"):
                    yield self.store.get_json(key)
        else:  # many small GETs: in parallel, results in order
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=16) as pool:
                yield from pool.map(self.read, list(item_ids))

    def count(self) -> int:
        return len(self.done_ids())

    def keep_if_inputs(self, fingerprint: str) -> int:
        """Records are results *of some inputs* (adapters, essays): when the stage's inputs changed since
        the records were written, they are stale. Compare ``fingerprint`` with the one stored beside the
        records; on a change delete the records and store the new one. Returns how many were deleted."""
        key = f"{self.prefix}/{INPUTS}"
        if self.store.exists(key) and self.store.get_text(key).strip() == fingerprint:
            return 0
        stale = self.count() if self.store.exists(key) else 0
        if stale:
            self.store.delete_prefix(self.prefix + "/")
        self.store.put_text(key, fingerprint + "\n")
        return stale


def fingerprint(*parts: Any) -> str:
    """A stable digest of JSON-able inputs (for ``RecordSet.keep_if_inputs``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
