"""``student.table_in_prompt``: the chart's data table (or OCR text) in the student's user turn, written by the
dataset stage into a ``data`` column and read by training and generation; off by default (the seed's
student sees the image and the title), on in the demo (its vision tower is random)."""

from __future__ import annotations

from pathlib import Path

from student_fixtures import sample_charts
from test_dataset import RUN, run_dataset, write_upstream

from pipeline import artifacts
from pipeline.config import load_config
from pipeline.models.chat import answer_text, encode, prompt_text, user_prompt
from pipeline.prompts import STUDENT_TABLE_ROWS, TABLE_HEADING, chart_data
from pipeline.store import open_store

REPO = Path(__file__).resolve().parents[1]
TABLE = [["Year", "Sales in million U.S. dollars"], *[[str(2000 + i), f"{10 + 3 * i}.5"] for i in range(20)]]


def test_user_prompt_carries_the_data_only_when_given():
    seed = user_prompt("Sales of tea")
    assert seed == user_prompt("Sales of tea", "") == user_prompt("Sales of tea", "  \n")
    assert seed.startswith('The chart is titled "Sales of tea".') and TABLE_HEADING not in seed
    data = chart_data({"table": TABLE}, STUDENT_TABLE_ROWS)
    with_data = user_prompt("Sales of tea", data)
    assert with_data.startswith(seed) and with_data.endswith(data)
    assert "2011 | 43.5" in data and "2012 | 46.5" not in data and "(8 more rows)" in data  # 12 rows at most


def test_dataset_writes_the_data_column_and_says_so_in_the_card(tmp_path):
    store = open_store(str(tmp_path / "store"))
    write_upstream(store)
    charts = store.get_jsonl(f"{RUN}/ingest/charts.jsonl")
    for i, chart in enumerate(charts):
        chart["table"] = TABLE if i % 2 else None
        chart["ocr_text"] = None if i % 2 else f"Pew OCR text of chart {i} | 48% | 52%"
    store.put_jsonl(f"{RUN}/ingest/charts.jsonl", charts)
    by_id = {c["id"]: c for c in charts}

    ctx = run_dataset(store, "student.table_in_prompt=true")
    rows = [r for split in ("train", "validation", "test")
            for r in artifacts.load_split(ctx, "structured", split).remove_columns("image")]
    assert rows and all(r["data"] == chart_data(by_id[r["chart_id"]], 12, 400) and r["data"] for r in rows)
    assert ctx.summary_of("dataset")["table_in_prompt"] is True
    assert "**The student sees the data** (`student.table_in_prompt: true`)" in \
        store.get_text(f"{RUN}/dataset/structured/README.md")

    ctx = run_dataset(store)  # the default: the seed's prompt, no data
    rows = list(artifacts.load_split(ctx, "unstructured", "train").remove_columns("image"))
    assert rows and all(r["data"] == "" for r in rows)
    assert "`data` is empty: the student saw the image and the title only" in \
        store.get_text(f"{RUN}/dataset/unstructured/README.md")


def test_training_and_generation_prompts_hold_the_data(tiny_loaded, sample_dir):
    """The encoded prompt (what training masks and generation continues from) holds the table's rows; the
    answer is the same tokens with or without data, so only the prompt changes."""
    _, processor = tiny_loaded
    [(image, title)] = sample_charts(sample_dir, 1)
    data = chart_data({"table": TABLE}, STUDENT_TABLE_ROWS)
    plain, with_data = encode(processor, image, title, "An essay."), encode(processor, image, title, "An essay.",
                                                                              data=data)
    assert len(with_data.input_ids) > len(plain.input_ids) + 40
    decoded = processor.tokenizer.decode(with_data.input_ids)
    assert "19.5" in decoded and "43.5" in decoded and "46.5" not in decoded
    assert data in prompt_text(processor, title, data) and data not in prompt_text(processor, title)
    assert answer_text(processor, title, "An essay.", data) == answer_text(processor, title, "An essay.")
    answer = [t for t in with_data.labels if t != -100]
    assert answer == [t for t in plain.labels if t != -100]  # the same answer tokens are trained on


def test_demo_configs_turn_it_on_and_the_default_is_off():
    assert load_config(None).student.table_in_prompt is False
    for path in ("configs/local.yaml", "k8s/overlays/local/run.yaml"):
        assert load_config(REPO / path).student.table_in_prompt is True, path
    assert load_config(REPO / "configs/cluster.yaml").student.table_in_prompt is False  # the seed's setting
