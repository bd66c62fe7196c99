"""Per-item records and shards: write-once keys, resume listing, disjoint complete shards."""

from __future__ import annotations

import pytest

from pipeline.errors import PipelineError
from pipeline.records import RecordSet, Shard, safe_id, stable_hash


def test_shards_partition_items():
    ids = [f"chart-{i}" for i in range(500)]
    shards = [Shard(i, 4).select(ids) for i in range(4)]
    assert sorted(sum(shards, [])) == sorted(ids)  # complete
    assert sum(len(s) for s in shards) == len(ids)  # disjoint
    assert all(60 < len(s) < 190 for s in shards)  # roughly balanced
    assert Shard(1, 4).select(reversed(ids)) == list(reversed(shards[1]))  # order-independent membership


def test_shard_parsing_and_env():
    assert Shard.parse("2/5") == Shard(2, 5) and Shard.parse(None).whole
    assert Shard.from_env({"JOB_COMPLETION_INDEX": "3", "JOB_COMPLETION_COUNT": "4"}) == Shard(3, 4)
    assert Shard.from_env({}).whole
    for bad in ("5/5", "x/2", "-1/3"):
        with pytest.raises(PipelineError):
            Shard.parse(bad)
    with pytest.raises(PipelineError, match="JOB_COMPLETION_COUNT"):
        Shard.from_env({"JOB_COMPLETION_INDEX": "0"})


def test_stable_hash_is_stable():
    assert stable_hash("abc", "s") == stable_hash("abc", "s") != stable_hash("abc", "t")
    assert isinstance(stable_hash("x"), int) and 0 <= stable_hash("x") < 2**64


def test_records_resume(store):
    rs = RecordSet(store, "run/teacher/records")
    ids = ["a", "b", "c/ab", "d"]
    assert rs.pending(ids) == ids
    rs.write("a", {"id": "a"})
    rs.write("c/ab", {"id": "c/ab"})
    assert rs.pending(ids) == ["b", "d"]
    assert rs.done_ids() == {"a", "c/ab"} and rs.count() == 2
    assert [r["id"] for r in rs.read_all()] == ["a", "c/ab"]
    assert rs.read("c/ab") == {"id": "c/ab"}


def test_safe_id():
    assert safe_id("pew two:col/ab") == "pew_two_col/ab"
    with pytest.raises(PipelineError):
        safe_id("a/../b")


def test_records_of_changed_inputs_are_dropped(store):
    from pipeline.records import fingerprint

    rs = RecordSet(store, "run/generate/records")
    fp = fingerprint({"adapter": "v1"}, 48)
    assert rs.keep_if_inputs(fp) == 0  # first run: nothing to drop
    rs.write("baseline/a", {"essay": "x"})
    rs.write("baseline/b", {"essay": "y"})
    assert rs.keep_if_inputs(fingerprint({"adapter": "v1"}, 48)) == 0  # same inputs: records kept
    assert rs.done_ids() == {"baseline/a", "baseline/b"}
    assert rs.keep_if_inputs(fingerprint({"adapter": "v2"}, 48)) == 2  # new adapter: both stale
    assert rs.done_ids() == set() and rs.pending(["baseline/a"]) == ["baseline/a"]
    assert fingerprint({"b": 1, "a": 2}) == fingerprint({"a": 2, "b": 1}) != fingerprint({"a": 1})
