"""ingest on the bundled sample and on crafted sources: counts add up, bad charts rejected with reasons."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.context import StageContext
from pipeline.executors.local import run_stage
from pipeline.store import open_store


def ingest(store_uri: str, source: Path, *overrides: str):
    config = load_config(None, [f"store.uri={store_uri}", f"data.source={source}", *overrides])
    store = open_store(store_uri)
    assert run_stage(config, store, "ingest")
    ctx = StageContext(config, store, "ingest")
    return (store, store.get_jsonl(ctx.key("charts.jsonl")), store.get_jsonl(ctx.key("rejected.jsonl")),
            ctx.summary_of("ingest"))


def sample_rows(sample_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (sample_dir / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture
def crafted(sample_dir, tmp_path) -> Path:
    """A copy of 12 sample charts with one truncated image, one garbage image, one empty title, one
    missing image, one unreadable data file and one duplicate id."""
    rows = [r for r in sample_rows(sample_dir) if r["chart_type_ielts"] != "other"][:12]
    root = tmp_path / "src"
    for sub in ("images", "data"):
        (root / sub).mkdir(parents=True)
    for r in rows:
        shutil.copy(sample_dir / r["image"], root / r["image"])
        shutil.copy(sample_dir / r["data"], root / r["data"])
    truncated = root / rows[0]["image"]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (root / rows[1]["image"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    rows[2]["title"] = "   "
    (root / rows[3]["image"]).unlink()
    (root / rows[4]["data"]).write_bytes(b"\xff\xfe\x00bad\xff")
    rows.append(dict(rows[5]))  # duplicate id
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_bundled_sample(sample_dir, tmp_path):
    store, charts, rejected, summary = ingest(str(tmp_path / "s"), sample_dir)
    rows = sample_rows(sample_dir)
    assert len(charts) + len(rejected) == len(rows) == summary["read"]
    expected = {r["id"]: r["chart_type_ielts"] for r in rows}
    assert {c["id"]: c["type"] for c in charts} == {k: v for k, v in expected.items() if v != "other"}
    assert {r["id"] for r in rejected} == {k for k, v in expected.items() if v == "other"}
    assert all("no IELTS Task 1 equivalent" in r["reason"] for r in rejected)
    statista = next(c for c in charts if c["source"] == "statista")
    assert statista["table"][0] and len(statista["table"]) >= 2  # header + rows
    pew = next(c for c in charts if c["source"] == "pew")
    assert pew["table"] is None and pew["ocr_text"]
    for c in charts:  # every image is in the store and decodes
        assert store.exists(c["image"]) and c["image"].startswith("demo/ingest/images/")
    gif_ids = {r["id"] for r in rows if r["image_format"] == "gif"}
    assert gif_ids and all(c["image_format"] == "png" for c in charts if c["id"] in gif_ids)


def test_transparent_charts_are_composited_on_white(sample_dir, tmp_path):
    """Pew's palette PNGs with transparency (up to 40 % of the pixels) are stored as RGB on white: every
    reader (teacher, student) sees the chart's white background, not black."""
    import io

    from PIL import Image

    store, charts, _, _ = ingest(str(tmp_path / "s"), sample_dir)
    source = {r["id"]: r for r in sample_rows(sample_dir)}
    transparent = [c for c in charts if "transparency" in Image.open(sample_dir / source[c["id"]]["image"]).info]
    assert len(transparent) >= 4
    for chart in transparent:
        original = Image.open(sample_dir / source[chart["id"]]["image"]).convert("RGBA")
        stored = Image.open(io.BytesIO(store.get_bytes(chart["image"])))
        assert stored.mode == "RGB" and stored.size == original.size
        clear = [xy for xy in ((x, y) for x in range(0, original.width, 7) for y in range(0, original.height, 7))
                 if original.getpixel(xy)[3] == 0]
        assert clear and all(stored.getpixel(xy) == (255, 255, 255) for xy in clear)


def test_bad_charts_rejected_with_reasons(crafted, tmp_path):
    _, charts, rejected, summary = ingest(str(tmp_path / "s"), crafted)
    rows = sample_rows(crafted)
    reasons = {r["id"]: r["reason"] for r in rejected}
    assert len(charts) == 7 and len(rejected) == 6 and summary["read"] == 13
    assert reasons[rows[0]["id"]].startswith("image undecodable") and "truncated" in reasons[rows[0]["id"]]
    assert reasons[rows[1]["id"]].startswith("image undecodable")
    assert reasons[rows[2]["id"]] == "title missing or empty"
    assert reasons[rows[3]["id"]].startswith("image missing")
    assert reasons[rows[4]["id"]].startswith("data file unreadable")
    assert "duplicate chart id" in reasons.values()
    assert rows[5]["id"] in {c["id"] for c in charts}  # the first of a duplicated id is kept


def test_pixel_cap_and_limit(sample_dir, tmp_path):
    _, charts, rejected, _ = ingest(str(tmp_path / "s"), sample_dir, "data.limit=10", "data.max_pixels=200000")
    assert len(charts) + len(rejected) == 10
    ids = [r["id"] for r in sample_rows(sample_dir)[:10]]
    assert {c["id"] for c in charts} | {r["id"] for r in rejected} == set(ids)
    assert any(r["reason"].startswith("image too large") for r in rejected)
    assert all(c["width"] * c["height"] <= 200000 for c in charts)


def test_s3_store_gives_same_output(sample_dir, tmp_path, s3_bucket):
    _, local_charts, local_rej, _ = ingest(str(tmp_path / "s"), sample_dir, "data.limit=30")
    store, s3_charts, s3_rej, _ = ingest(s3_bucket, sample_dir, "data.limit=30")
    assert s3_charts == local_charts and s3_rej == local_rej
    assert store.get_bytes(s3_charts[0]["image"]) == (tmp_path / "s" / s3_charts[0]["image"]).read_bytes()


def test_chart_to_text_checkout_layout(sample_dir, tmp_path):
    """The repository layout real users have: {statista,pew}_dataset/dataset[/multiColumn]/{imgs,data,titles}."""
    rows = [r for r in sample_rows(sample_dir) if r["source"] == "statista"][:6]
    pew = [r for r in sample_rows(sample_dir) if r["source"] == "pew" and r["chart_type"] == "area"][:1]
    root = tmp_path / "Chart-to-text"
    meta: dict[Path, list[str]] = {}
    for r in rows + pew:
        folder = root / "/".join(r["orig"]["image"].split("/")[:-2])
        n = r["orig"]["file_no"].split("-")[1]
        for sub in ("imgs", "data", "titles"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_dir / r["image"], folder / "imgs" / f"{n}.png")
        ext = "csv" if r["data_format"] == "csv_table" else "txt"
        shutil.copy(sample_dir / r["data"], folder / "data" / f"{n}.{ext}")
        (folder / "titles" / f"{n}.txt").write_text(r["title"])
        meta.setdefault(folder, ["id,title,chartType"]).append(f'{n},"x",{r["chart_type"]}')
    for folder, lines in meta.items():
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    _, charts, rejected, _ = ingest(str(tmp_path / "s"), root)
    assert {c["id"] for c in charts} == {r["id"] for r in rows}  # same ids as the sample's manifest
    assert {c["id"]: c["type"] for c in charts} == {r["id"]: r["chart_type_ielts"] for r in rows}
    assert [r["id"] for r in rejected] == [pew[0]["id"]] and "area" in rejected[0]["reason"]


def test_unknown_source_layout_is_one_line_error(tmp_path):
    from pipeline.errors import StageError

    with pytest.raises(StageError, match="expected a folder with manifest.jsonl"):
        ingest(str(tmp_path / "s"), tmp_path)


def test_stride_spans_the_source_in_stable_order(sample_dir, tmp_path):
    _, charts, rejected, summary = ingest(str(tmp_path / "s"), sample_dir, "data.stride=3", "data.limit=30")
    expected = [r["id"] for r in sample_rows(sample_dir)][::3][:30]
    assert summary["read"] == 30
    assert {c["id"] for c in charts} | {r["id"] for r in rejected} == set(expected)
    assert {c["type"] for c in charts} == {"bar", "line", "pie", "table"}


def test_hostile_rows_rejected_one_by_one_and_colliding_ids_kept_apart(sample_dir, tmp_path, monkeypatch):
    """Bad ids, titles and paths are rejected per row with a reason (the stage never stops); ids that an
    older key scheme mapped to one key (``coll x``/``coll_x``/``coll:x``) or one folder (``a``, ``a/b``),
    or that look like paths (``..``, ``a\\..\\b``), each keep their own image and teacher essay, each paid once."""
    from fake_llm import FakeLLM

    good = next(r for r in sample_rows(sample_dir) if r["chart_type_ielts"] == "bar")
    root = tmp_path / "src"
    (root / "images").mkdir(parents=True)
    (root / "data").mkdir()
    shutil.copy(sample_dir / good["image"], root / good["image"])
    shutil.copy(sample_dir / good["data"], root / good["data"])
    outside = tmp_path / "secret.png"
    shutil.copy(sample_dir / good["image"], outside)

    def row(chart_id, title="A chart of things", **extra):
        return {**good, "id": chart_id, "title": title, **extra}

    kept = ["coll x", "coll_x", "coll:x", ".", "..", "../up", "/abs", "a", "a/b", "a\\..\\b"]
    rows = [row(i, f"Chart {n}") for n, i in enumerate(kept)] + [
        row(""), row("nul\x00id"), row("x" * 300), row("t-number", 42), row("t-list", ["a"]), row(["list-id"]),
        row("p-abs", image=str(outside)), row("p-up", image="../secret.png"), row("p-data", data="../../etc/passwd")]
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store, charts, rejected, summary = ingest(str(tmp_path / "s"), root)
    assert [c["id"] for c in charts] == kept
    assert summary["read"] == len(rows) == len(charts) + len(rejected)
    reasons = {r["id"]: r["reason"] for r in rejected}
    assert reasons[""] == "chart id is empty"
    for bad in ("nul\x00id", "x" * 300):
        assert "is not usable as a key" in reasons[bad], bad
    assert reasons["t-number"] == "title is not a string (int)" and reasons["t-list"] == "title is not a string (list)"
    assert reasons[None] == "manifest.jsonl line 16 has an 'id' that is not a string (list)"
    assert next(r for r in rejected if r["id"] is None)["line"] == 16
    assert reasons["p-abs"].startswith("image path") and "leaves data.source" in reasons["p-abs"]
    assert "leaves data.source" in reasons["p-up"] and "leaves data.source" in reasons["p-data"]
    images = list(store.list("demo/ingest/images/"))
    assert len(images) == len(kept) and all(k.count("/") == 3 for k in images)  # one name each, inside images/

    monkeypatch.setenv("MINIMAX_API_KEY", "k")
    with FakeLLM() as llm:
        config = load_config(None, [f"store.uri={tmp_path / 's'}", f"data.source={root}",
                                    f"teacher.base_url={llm.base_url}", "teacher.vision=true"])
        assert run_stage(config, store, "teacher")
    essays = store.get_jsonl("demo/teacher/essays.jsonl")
    assert [e["chart_id"] for e in essays] == kept
    assert all(n == 1 for n in llm.counts.values()) and len(llm.counts) == len(kept)
    names = [k.rsplit("/", 1)[1] for k in store.list("demo/teacher/records/")]
    assert {"coll%20x.json", "coll%3Ax.json", "coll_x.json", "a.json", "a%2Fb.json"} <= set(names)  # escaped


def test_undecodable_and_broken_lines_are_rejected_by_line_number(sample_dir, tmp_path):
    """A non-UTF-8 byte or a non-JSON line is one rejected row each, named by its line number and outside the
    id space (a real chart called ``manifest-line-2`` is kept); every other chart is read."""
    rows = [r for r in sample_rows(sample_dir) if r["chart_type_ielts"] == "bar"][:3]
    root = tmp_path / "src"
    root.mkdir()
    for sub in ("images", "data"):
        (root / sub).symlink_to(sample_dir / sub, target_is_directory=True)
    rows[2] = {**rows[2], "id": "manifest-line-2"}
    lines = [json.dumps(rows[0]).encode(), b'{"id": "caf\xe9", "title": "latin-1"}', b"not json",
             json.dumps(rows[1]).encode(), json.dumps(rows[2]).encode()]
    (root / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    store, charts, rejected, summary = ingest(str(tmp_path / "s"), root)
    assert [c["id"] for c in charts] == [rows[0]["id"], rows[1]["id"], "manifest-line-2"]
    assert [(r["id"], r["line"]) for r in rejected] == [(None, 2), (None, 3)]
    assert rejected[0]["reason"] == "manifest.jsonl line 2 is not UTF-8 (byte 0xe9 at column 12)"
    assert rejected[1]["reason"] == "manifest.jsonl line 3 is not a JSON object with an 'id'"
    assert summary["read"] == 5 and summary["rejected_by_reason"] == {
        "manifest.jsonl is not UTF-8": 1, "manifest.jsonl is not a JSON object with an 'id'": 1}
