"""Per-item records and shards: write-once keys, resume listing, disjoint complete shards."""

from __future__ import annotations

import pytest

from pipeline.errors import PipelineError
from pipeline.records import Claims, RecordSet, Shard, safe_id, stable_hash, unsafe_id


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
    with pytest.raises(PipelineError, match="JOB_COMPLETION_INDEX='x'.*whole numbers"):
        Shard.from_env({"JOB_COMPLETION_INDEX": "x", "JOB_COMPLETION_COUNT": "2"})


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


def test_safe_id_is_one_to_one():
    assert safe_id("pew two:col/ab") == "pew%20two%3Acol%2Fab" and safe_id("pew-14_x.y") == "pew-14_x.y"
    ids = ["coll x", "coll_x", "coll%20x", "chart:a", "chart_a", "_claims", "%5Fclaims", "ünï/cödé", "a b/c",
           "a", "a/b", "a/b/c", "a\\..\\b", "a/../b", "..", ".", ".hidden", "a//b", "/abs"]
    keys = [safe_id(i) for i in ids]
    assert len(set(keys)) == len(ids)  # injective
    assert [unsafe_id(k) for k in keys] == ids  # and back
    assert not any(k.startswith(("_", ".")) for k in keys)  # "_" names are the runner's; nothing hidden
    assert not any(set(k) & set("/\\") for k in keys)  # one name: never a folder, never outside it
    for bad in ("", "x\x00y", "tab\there", "x" * 300):
        with pytest.raises(PipelineError, match="cannot be used as a record key"):
            safe_id(bad)


def test_ids_never_share_a_folder_or_leave_theirs(store):
    """``a`` and ``a/b`` (and ``a\\..\\b``, ``..``) are one escaped name each in every namespace: records,
    claims and images never meet, on a local directory and on S3 (each id's claim was another id's folder)."""
    from pipeline.records import item_key

    ids = ["a", "a/b", "a/b/c", "a\\..\\b", "..", "a.json/b", "_claims", "x/../../../escape"]
    rs = RecordSet(store, "run/teacher/records")
    claims = Claims(rs, lease_s=60, owner="host-a:1:a")
    for i in ids:
        rs.write(i, {"id": i})
        assert claims.take(i)
        store.put_bytes(item_key("run/ingest/images", i, ".png"), i.encode())
    assert rs.done_ids() == set(ids) and [rs.read(i)["id"] for i in ids] == ids
    for folder, suffix in (("run/teacher/records", ".json"), ("run/teacher/records/_claims", ".claim"),
                           ("run/ingest/images", ".png")):
        keys = [k for k in store.list(folder + "/") if k.count("/") == folder.count("/") + 1]
        assert len(keys) == len(ids) and all(k.endswith(suffix) for k in keys), keys
    assert len(list(store.list("run/"))) == 3 * len(ids)  # nothing anywhere else
    assert [store.get_text(item_key("run/ingest/images", i, ".png")) for i in ids] == ids


def test_records_of_the_old_per_folder_layout_are_still_read(store):
    """A judge record written before ids became one name (``cmp/c1/ab`` in folders) counts as done and is
    read: it is never paid for again."""
    rs = RecordSet(store, "run/judge/records")
    store.put_json("run/judge/records/cmp/c%201/ab.json", {"verdict": "a"})
    assert rs.done_ids() == {"cmp/c 1/ab"} and rs.pending(["cmp/c 1/ab", "cmp/c 1/ba"]) == ["cmp/c 1/ba"]
    assert rs.read("cmp/c 1/ab") == {"verdict": "a"}
    assert [r["verdict"] for r in rs.read_all()] == ["a"]


def test_started_says_whether_a_record_exists_from_a_short_listing(store, monkeypatch):
    from pipeline import records

    rs = RecordSet(store, "run/teacher/records")
    assert not rs.started()
    rs.keep_if_inputs(records.fingerprint("v1"))  # the runner's names beside the records are not records
    Claims(rs).take("zz")
    store.put_text("run/teacher/records/_corrupt/a.20261207T000000Z", "{")
    assert not rs.started() and rs.count() == 0
    rs.write("zz", {"essay": "x"})  # sorted after every '_' name
    assert rs.started()
    legacy = RecordSet(store, "run/judge/records")
    store.put_json("run/judge/records/cmp/c1/ab.json", {"verdict": "a"})
    assert legacy.started() and legacy.count() == 1
    legacy.keep_if_inputs(records.fingerprint("v1"))
    assert legacy.keep_if_inputs(records.fingerprint("v2")) == 1  # moved aside: its folder is empty now
    assert not legacy.started() and legacy.count() == 0
    crowded = RecordSet(store, "run/generate/records")  # more '_' names than one listing holds: counted
    monkeypatch.setattr(records, "FIRST_NAMES", 2)
    for name in ("_a", "_b", "_c"):
        store.put_text(f"run/generate/records/{name}", "x")
    assert not crowded.started()
    crowded.write("zz", {"essay": "x"})
    assert crowded.started()


def test_colliding_ids_keep_their_own_records(store):
    rs = RecordSet(store, "run/teacher/records")
    ids = ["coll x", "coll_x", "chart:a", "chart_a"]
    for i in ids:
        rs.write(i, {"id": i})
    assert rs.pending(ids) == [] and rs.count() == 4
    assert [rs.read(i)["id"] for i in ids] == ids


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
    aside = [k for k in store.list("run/generate/records/_stale/")]  # moved aside, never deleted
    assert [k.split("/", 5)[-1] for k in aside] == ["_INPUTS", "baseline%2Fa.json", "baseline%2Fb.json"]
    assert store.get_json(aside[1]) == {"essay": "x"}
    assert rs.restore_stale() == 2  # the run failed before writing a new record: they come back
    assert rs.done_ids() == {"baseline/a", "baseline/b"} and not list(store.list("run/generate/records/_stale/"))
    assert rs.keep_if_inputs(fingerprint({"adapter": "v1"}, 48)) == 0  # and so does their fingerprint
    assert fingerprint({"b": 1, "a": 2}) == fingerprint({"a": 2, "b": 1}) != fingerprint({"a": 1})


def test_claims_one_owner_expiry_and_takeover(store):
    rs = RecordSet(store, "run/teacher/records")
    first, second = Claims(rs, lease_s=60, owner="host-a:1:a"), Claims(rs, lease_s=60, owner="host-b:1:b")
    assert first.take("c/1") and not second.take("c/1")  # exclusive
    assert first.take("c/1")  # its own claim again
    assert rs.done_ids() == set() and rs.pending(["c/1"]) == ["c/1"]  # a claim is not a record
    first.renew()
    assert not second.take("c/1")
    first.release("c/1")
    assert second.take("c/1") and not first.take("c/1")
    expired = Claims(rs, lease_s=-1, owner="host-c:1:c")  # its lease ran out (it died on another host)
    assert expired.take("c/2")
    contenders = [Claims(rs, lease_s=60, owner=f"host-{i}:1:x") for i in range(4)]
    assert [c.take("c/2") for c in contenders].count(True) == 1  # exactly one takes the expired claim over
    store.put_bytes(first.key("c/3"), b'{"owner": "host-d:1')  # a cut write: never a claim that holds forever
    assert [c.take("c/3") for c in contenders].count(True) == 1


def test_a_corrupt_record_is_moved_aside_and_redone(store):
    from pipeline.errors import StoreError

    rs = RecordSet(store, "run/teacher/records")
    rs.write("a b", {"id": "a b"})
    store.put_bytes(rs.key("a b"), b'{"id": "a b", "ess')  # a cut write
    with pytest.raises(StoreError, match=r"record of 'a b' was corrupt \(not valid JSON.*moved to .*_corrupt/.*rerun"):
        list(rs.read_all(["a b"]))
    assert rs.pending(["a b"]) == ["a b"]  # redone by the next run
    assert [k.split("/")[3] for k in store.list("run/teacher/records/")] == ["_corrupt"]
