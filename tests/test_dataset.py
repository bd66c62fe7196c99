"""The dataset stage: split sizes and stability, both variants through the store (local and S3), the card,
and loading back with ``datasets`` (images decode to PIL)."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import artifacts
from pipeline.config import DatasetSection, load_config
from pipeline.context import StageContext
from pipeline.errors import StageError
from pipeline.essays import parse_structured, to_canonical, unstructure
from pipeline.stages import dataset
from pipeline.store import open_store

RUN = "t"
ESSAY = ('1. <Describe a graph>:\n"The {type} chart shows {title}."\n\n'
         '2. <Find the key points, trends and compare data>:\n\nParagraph 1:\n"Values for {cid} rose from 5 to 9."\n\n'
         'Paragraph 2:\n"They fell in 2010."\n\n3. <Write a summary of presented data>:\n"Overall, {cid} grew."')
MESSY = ('Here is the essay:\r\n1. <Describe a graph:>\r\n\u201cThe {type} chart shows {title}.\u201d\r\n\r\n'
         '2. <Find the key points and trends:>\r\n**Paragraph1:** Values for {cid} rose from 5 to 9.  \r\n\r\n'
         'Paragraph 2:\r\n"They fell in 2010."\r\n3. <Write a summary of presented data:>\r\nOverall, {cid} grew.')
PLAIN = "The {type} chart shows {title}.\n\nValues for {cid} rose from 5 to 9.\n\nThey fell in 2010.\n\nOverall, {cid} grew."


def _png(seed: int, size=(48, 36)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, 120)).save(buf, "PNG")
    return buf.getvalue()


def write_upstream(store, n: int = 14) -> dict[str, dict]:
    """Synthetic ingest and teacher outputs in the brief's layout. Returns what each chart should become."""
    cfg = load_config(overrides=[f"run.id={RUN}"])
    charts, records, expect = [], [], {}
    for i in range(n):
        cid, ctype = f"statista-two_col-{100 + i}", ("bar", "line", "pie", "table")[i % 4]
        title = f"Sales of item {i} in 2010"
        key = f"{RUN}/ingest/images/{cid}.png"
        store.put_bytes(key, _png(i, (40 + i, 30)))
        charts.append({"id": cid, "type": ctype, "title": title, "source": "statista", "source_type": ctype,
                       "image": key, "image_format": "png", "width": 40 + i, "height": 30, "table": None,
                       "ocr_text": None})
        fmt = {0: ESSAY, 1: MESSY, 2: PLAIN}.get(i % 7, ESSAY)
        status = "rejected" if i % 7 == 3 else "accepted"
        essay = "" if status == "rejected" else "Just one short paragraph." if i % 7 == 5 else \
            fmt.format(type=ctype, title=title, cid=cid)
        records.append({"chart_id": cid, "type": ctype, "status": status, "essay": essay, "attempts": 1,
                        "reason": "too_short: 40 words" if status == "rejected" else None, "failures": [],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1}, "cost_usd": 0.0,
                        "template": f"{ctype}.txt", "template_version": "v1", "model": "teacher-x",
                        "raw_answer": essay})
        if status == "accepted" and i % 7 != 5:
            expect[cid] = {"clean": ESSAY.format(type=ctype, title=title, cid=cid), "size": (40 + i, 30)}
    store.put_jsonl(f"{RUN}/ingest/charts.jsonl", charts)
    StageContext(cfg, store, "ingest").complete({"read": n + 3, "accepted": n})
    store.put_jsonl(f"{RUN}/teacher/essays.jsonl", records)
    StageContext(cfg, store, "teacher").complete({"accepted": len(expect)})
    return expect


def run_dataset(store, *overrides: str) -> StageContext:
    ctx = StageContext(load_config(overrides=[f"run.id={RUN}", *overrides]), store, "dataset")
    dataset.run(ctx)
    return ctx


# --------------------------------------------------------------------------- the split


@pytest.mark.parametrize("n, train, test, validation", [(3475, 2432, 521, 522), (10, 7, 1, 2), (120, 84, 18, 18),
                                                        (0, 0, 0, 0)])
def test_split_sizes(n, train, test, validation):
    ids = [f"chart-{i}" for i in range(n)]
    random.Random(n).shuffle(ids)
    splits = dataset.assign_splits(ids, DatasetSection())
    assert set(splits) == set(ids)
    sizes = {s: sum(1 for v in splits.values() if v == s) for s in dataset.SPLITS}
    assert sizes == {"train": train, "test": test, "validation": validation}


def test_split_is_by_hash_stable_and_configurable():
    ids = [f"chart-{i:04d}" for i in range(500)]
    first = dataset.assign_splits(ids, DatasetSection())
    assert dataset.assign_splits(list(reversed(ids)), DatasetSection()) == first  # order of input irrelevant
    assert [first[i] for i in ids[:350]].count("train") < 350  # not by list position
    assert dataset.assign_splits(ids, DatasetSection(seed="other")) != first
    custom = dataset.assign_splits(ids, DatasetSection(train=0.8, test=0.1, validation=0.1))
    assert sorted(custom.values()).count("train") == 400 and sorted(custom.values()).count("test") == 50


# --------------------------------------------------------------------------- the stage


def test_stage_round_trip_through_store(store_uri, tmp_path):
    store = open_store(store_uri)
    expect = write_upstream(store)
    ctx = run_dataset(store)
    splits = store.get_json(f"{RUN}/dataset/splits.json")
    assert set(splits) == set(expect)  # rejected and unparseable charts are in neither variant
    assert splits == dataset.assign_splits(list(expect), DatasetSection())

    for variant in dataset.VARIANTS:
        seen = {}
        for split in dataset.SPLITS:
            ds = artifacts.load_split(ctx, variant, split)
            assert ds.column_names == list(dataset.COLUMNS) and ds.features["image"].__class__.__name__ == "Image"
            for row in ds:
                seen[row["chart_id"]] = split
                want = expect[row["chart_id"]]
                assert row["image"].size == want["size"] and row["image"].mode == "RGB"  # decoded PIL image
                assert row["essay"] == (want["clean"] if variant == "structured" else unstructure(want["clean"]))
        assert seen == splits  # same chart, same split, in both variants

    summary = ctx.summary_of("dataset")
    assert summary["rejected_by_teacher"] == 2 and summary["excluded_unparseable"] == 2
    assert summary["structure_inferred"] == 2 and summary["rows"] == len(expect) == 10
    assert summary["splits"] == {"train": 7, "validation": 2, "test": 1}

    # A rerun gives the same splits; the downloaded copy loads with datasets, via the card's configs too.
    run_dataset(store)
    assert store.get_json(f"{RUN}/dataset/splits.json") == splits
    from datasets import load_dataset

    local = store.download_dir(f"{RUN}/dataset/structured", tmp_path / "structured")
    files = {s: str(local / artifacts.split_file(s)) for s in dataset.SPLITS}
    by_parquet = load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "cache"))
    by_card = load_dataset(str(local), cache_dir=str(tmp_path / "cache"))
    for loaded in (by_parquet, by_card):
        assert {s: loaded[s].num_rows for s in dataset.SPLITS} == summary["splits"]
        assert loaded["train"][0]["image"].size == expect[loaded["train"][0]["chart_id"]]["size"]
        assert parse_structured(loaded["train"][0]["essay"])


def test_dataset_card(tmp_path):
    store = open_store(str(tmp_path / "store"))
    write_upstream(store)
    run_dataset(store)
    text = store.get_text(f"{RUN}/dataset/unstructured/README.md")
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    from huggingface_hub import DatasetCard

    card = DatasetCard(text)  # the Hub's own parser of the YAML header
    assert card.data.license == "other" and card.data.configs[0]["config_name"] == "default"
    assert [f["name"] for f in header["dataset_info"]["features"]] == list(dataset.COLUMNS)
    assert {s["name"]: s["num_examples"] for s in header["dataset_info"]["splits"]} == \
        {"train": 7, "validation": 2, "test": 1}
    body = text.split("---\n", 2)[2]
    for needle in ("Teacher model: teacher-x. Prompt templates (version): bar.txt (v1), line.txt (v1)", "| rejected by the teacher (left out) | 2 |",
                   "| accepted but steps unparseable (left out of both variants) | 2 |", "Chart-to-Text",
                   "aclanthology.org/2022.acl-long.277", "too_short (2)", "2 accepted essays had no step markers",
                   "of 17 charts read from Chart-to-Text, 14 were kept"):
        assert needle in body, needle


def test_structure_inference_can_be_turned_off(tmp_path):
    store = open_store(str(tmp_path / "store"))
    write_upstream(store)
    summary = run_dataset(store, "dataset.infer_structure=false", "dataset.variants=[unstructured]") \
        .summary_of("dataset")
    assert summary["excluded_unparseable"] == 4 and summary["rows"] == 8 and summary["variants"] == ["unstructured"]
    assert not store.exists(f"{RUN}/dataset/structured/README.md")


def test_bad_inputs_fail_with_one_line(tmp_path):
    store = open_store(str(tmp_path / "store"))
    ctx = StageContext(load_config(overrides=[f"run.id={RUN}"]), store, "finetune")
    with pytest.raises(StageError, match="needs stage 'dataset'"):
        artifacts.load_split(ctx, "structured", "train")
    with pytest.raises(StageError, match="variant must be one of"):
        artifacts.load_split(ctx, "markdown", "train")
    records = [{"chart_id": "nope", "status": "accepted", "essay": to_canonical(ESSAY)}]
    with pytest.raises(StageError, match="'nope' has no chart"):
        dataset.build_rows([], records, DatasetSection())
    write_upstream(store, n=1)
    store.put_jsonl(f"{RUN}/teacher/essays.jsonl", [dict(store.get_jsonl(f"{RUN}/teacher/essays.jsonl")[0],
                                                         essay="One paragraph only.")])
    with pytest.raises(StageError, match="no usable essays: 0 of 1 .* 1 accepted but without parseable steps"):
        run_dataset(store)


def test_push_dataset_cli_needs_a_built_dataset(tmp_path):
    cli = str(Path(sys.executable).parent / "ielts-distill")
    out = subprocess.run([cli, "push-dataset", "--set", f"store.uri={tmp_path}", "--variant", "structured",
                          "--push-to-hub", "someone/essays"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and out.stderr.strip().startswith("error: ") and "dataset" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_sentence_inference_for_short_unmarked_prose():
    from pipeline.essays import EssayFormatError
    from pipeline.stages.dataset import structure_of

    prose = ("The chart shows sales in 2019. Sales rose by 10% in May. They fell in June.\n\n"
             "Overall, sales grew.")
    steps, inferred = structure_of(prose, "sentences")
    assert inferred and steps.description == "The chart shows sales in 2019."
    assert steps.paragraphs == ["Sales rose by 10% in May. They fell in June."]
    assert steps.overview == "Overall, sales grew."
    with pytest.raises(EssayFormatError):
        structure_of(prose, "paragraphs")  # two paragraphs are not enough without sentence inference
    with pytest.raises(EssayFormatError):
        structure_of("Only one sentence here.", "sentences")
