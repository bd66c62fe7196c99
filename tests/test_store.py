"""The artifact store's contract, run against a local directory and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import pytest

from pipeline.errors import ArtifactNotFound, StoreError
from pipeline.store import LocalStore, S3Store, open_store


def test_roundtrip_list_exists_delete(store):
    store.put_bytes("run/a/x.bin", b"\x00\x01")
    store.put_text("run/a/b/y.txt", "héllo")
    store.put_json("run/c.json", {"k": [1, 2]})
    store.put_jsonl("run/d.jsonl", [{"i": 1}, {"i": 2}])
    assert store.get_bytes("run/a/x.bin") == b"\x00\x01"
    assert store.get_text("run/a/b/y.txt") == "héllo"
    assert store.get_json("run/c.json") == {"k": [1, 2]}
    assert store.get_jsonl("run/d.jsonl") == [{"i": 1}, {"i": 2}]
    assert list(store.list("run/a/")) == ["run/a/b/y.txt", "run/a/x.bin"]
    assert store.exists("run/c.json") and not store.exists("run/nope.json")
    store.put_text("run/c.json", "{}")  # overwrite in place
    assert store.get_json("run/c.json") == {}
    assert store.delete_prefix("run/a/") == 2
    assert list(store.list("run/a/")) == []
    store.delete("run/never-there")  # no error
    assert sorted(store.list("run/")) == ["run/c.json", "run/d.jsonl"]


def test_missing_key_is_artifact_not_found(store):
    with pytest.raises(ArtifactNotFound, match="not found in store"):
        store.get_bytes("run/missing.json")


def test_dir_upload_download(store, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.txt").write_text("B")
    assert store.upload_dir(src, "run/model") == 2
    out = store.download_dir("run/model", tmp_path / "out")
    assert (out / "a.txt").read_text() == "A" and (out / "sub" / "b.txt").read_text() == "B"
    with pytest.raises(ArtifactNotFound):
        store.download_dir("run/none", tmp_path / "none")


def test_children_are_one_level_of_a_folder(store, tmp_path):
    for key in ("r1/config.yaml", "r1/teacher/records/a.json", "r1/teacher/_SUCCESS", "r2/x", "top.txt"):
        store.put_text(key, "x")
    assert store.children("") == ["r1/", "r2/", "top.txt"]
    assert store.children("r1/") == ["r1/config.yaml", "r1/teacher/"]
    assert store.children("r1/teacher/") == ["r1/teacher/_SUCCESS", "r1/teacher/records/"]
    assert store.children("r1/", limit=1) == ["r1/config.yaml"] and store.children("", limit=2) == ["r1/", "r2/"]
    assert store.children("nope/") == [] and store.children("top.txt/") == []
    with pytest.raises(StoreError, match="invalid store folder 'r1'"):
        store.children("r1")
    assert list(store.list("r1/", limit=2)) == ["r1/config.yaml", "r1/teacher/_SUCCESS"]
    assert list(store.list("", limit=1)) == ["r1/config.yaml"] and list(store.list("nope/", limit=1)) == []


def test_local_children_skip_temp_files_and_empty_folders(tmp_path):
    store = LocalStore(tmp_path)
    (tmp_path / "r" / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / "r" / ".x.json.tmp").write_text("partial")
    (tmp_path / "r" / "tmp-only").mkdir()
    (tmp_path / "r" / "tmp-only" / ".y.tmp").write_text("partial")
    assert store.children("r/") == []
    store.put_text("r/empty/deeper/z.json", "{}")
    assert store.children("r/") == ["r/empty/"]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a"])
def test_invalid_keys_rejected(store, key):
    with pytest.raises(StoreError, match="invalid store key"):
        store.put_text(key, "x")


def test_local_write_is_atomic_no_temp_left(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("r/f.bin", b"1" * 100_000)
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["f.bin"]


def test_open_store_dispatch(tmp_path, s3_env):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert isinstance(open_store("s3://bucket-x/pre/fix"), S3Store)
    with pytest.raises(StoreError, match="use a local directory"):
        open_store("gs://nope")


def test_s3_bad_credentials_clear_error(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    store = open_store(s3_bucket)
    with pytest.raises(StoreError, match="access denied by S3") as err:
        store.put_text("run/x.txt", "x")
    assert "wrong-secret" not in str(err.value) and "\n" not in str(err.value)


def test_s3_missing_bucket_clear_error(s3_env):
    store = open_store("s3://no-such-bucket-here/p")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
        store.put_text("run/x.txt", "x")


def test_s3_unreachable_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store = S3Store("s3://bucket-x/p", endpoint_url="http://127.0.0.1:9")
    store.client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint"):
        store.get_bytes("a")


def test_s3_prefix_isolation(s3_bucket):
    a = open_store(s3_bucket + "/one")
    b = open_store(s3_bucket + "/one-two")
    a.put_text("k.txt", "a")
    b.put_text("k.txt", "b")
    assert list(a.list("")) == ["k.txt"] and a.get_text("k.txt") == "a"


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path):
    """ENOSPC in the middle of a write: StoreError naming the file, the old content intact, no temp file."""
    from faults import full_disk

    store = LocalStore(tmp_path)
    store.put_bytes("r/f.bin", b"old")
    with full_disk(tmp_path, free=1000):
        with pytest.raises(StoreError, match=r"cannot write .*/r/f.bin: No space left on device") as err:
            store.put_bytes("r/f.bin", b"1" * 5000)  # cut after 1000 bytes
        with pytest.raises(StoreError, match="No space left on device"):
            store.create("r/other", b"x")
    assert "\n" not in str(err.value) and store.get_bytes("r/f.bin") == b"old"
    assert not store.exists("r/other")
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["f.bin"]  # no temp file left
