"""A demo sized by what it needs (``teacher.min_test_charts``): the teacher draws charts in a fixed seeded order,
a batch at a time, until the accepted essays give the configured number of test charts; data.limit caps it."""

from __future__ import annotations

import json
import logging

from fake_llm import FakeLLM, default_reply

from pipeline import artifacts
from pipeline.config import load_config
from pipeline.executors.local import run_pipeline, run_stage
from pipeline.records import Shard
from pipeline.stages.teacher import draw_order

QUESTIONS = "1. What is shown?\n2. Which is largest?\n3. Why?"


def _reply(request: dict, key: str) -> str:
    return QUESTIONS if sum(map(ord, key)) % 3 == 0 else default_reply(request, key)  # ~1 in 3 rejected


def _setup(tmp_path, sample_dir, llm, *extra):
    sets = [f"store.uri={tmp_path / 's'}", "run.id=t", f"data.source={sample_dir}", "data.limit=40",
            f"teacher.base_url={llm.base_url}", "teacher.max_attempts=1", "teacher.concurrency=4",
            "teacher.vision=false", "teacher.min_test_charts=4", "teacher.draw_batch=5", "dataset.train=0.4",
            "dataset.validation=0.1", "dataset.test=0.5", *extra]
    cfg = load_config(None, sets)
    return cfg, run_pipeline(cfg, ["ingest"])


def test_draws_whole_batches_until_enough_test_charts(tmp_path, sample_dir, caplog):
    with FakeLLM(reply=_reply) as llm:
        cfg, store = _setup(tmp_path, sample_dir, llm)
        charts = store.get_jsonl("t/ingest/charts.jsonl")
        with caplog.at_level(logging.INFO):
            assert run_stage(cfg, store, "teacher")
        first = llm.total
        assert run_stage(cfg, store, "teacher", force=True)  # a rerun pays for nothing
        assert llm.total == first
    order = [c["id"] for c in draw_order(charts, cfg.dataset.seed)]
    assert order == [c["id"] for c in draw_order(list(reversed(charts)), cfg.dataset.seed)]  # input order irrelevant
    rows = store.get_jsonl("t/teacher/essays.jsonl")
    drawn = len(rows)
    assert drawn % 5 == 0 and 5 <= drawn < len(charts) and first == drawn  # whole batches, one request each
    assert {r["chart_id"] for r in rows} == set(order[:drawn])
    assert [r["chart_id"] for r in rows] == [c["id"] for c in charts if c["id"] in set(order[:drawn])]  # ingest order
    accepted = [sum(r["status"] == "accepted" for r in rows if r["chart_id"] in set(order[:n]))
                for n in (drawn - 5, drawn)]
    test = [artifacts.split_sizes(a, 0.4, 0.5)["test"] for a in accepted]
    assert test[0] < 4 <= test[1]  # one batch fewer would not have been enough
    summary = json.loads(store.get_text("t/teacher/_SUCCESS"))["summary"]
    assert summary["charts"] == drawn and summary["charts_available"] == len(charts) and summary["test_charts"] == test[1]
    assert f"teacher: drew {drawn} of {len(charts)} charts (in batches of 5) for {accepted[1]} accepted essays, " \
           f"{accepted[1]} with three steps the dataset can read: {test[1]} test charts (teacher.min_test_charts 4)" \
           in caplog.text
    assert run_stage(cfg, store, "dataset")
    assert len([c for c, s in store.get_json("t/dataset/splits.json").items() if s == "test"]) == test[1]


def test_the_cap_is_data_limit_and_the_log_says_it_was_short(tmp_path, sample_dir, caplog):
    with FakeLLM(reply=_reply) as llm:
        cfg, store = _setup(tmp_path, sample_dir, llm, "teacher.min_test_charts=100", "data.limit=12")
        with caplog.at_level(logging.INFO):
            assert run_stage(cfg, store, "teacher")
    charts = store.get_jsonl("t/ingest/charts.jsonl")
    assert len(store.get_jsonl("t/teacher/essays.jsonl")) == len(charts) == llm.total
    assert "every chart drawn and still short: raise data.limit" in caplog.text


def test_shards_draw_the_same_batches_and_pay_each_chart_once(tmp_path, sample_dir):
    """Two shards of an Indexed Job (run one after the other here): in draw mode each works on every batch,
    split by claims, so the second finds the draw finished and only collects."""
    from pipeline.context import StageContext
    from pipeline.stages import teacher

    with FakeLLM(reply=_reply) as llm:
        cfg, store = _setup(tmp_path, sample_dir, llm)
        teacher.run(StageContext(cfg, store, "teacher", shard=Shard(0, 2)))
        paid = llm.total
        teacher.run(StageContext(cfg, store, "teacher", shard=Shard(1, 2)))
        assert llm.total == paid and max(llm.counts.values()) == 1
    rows = store.get_jsonl("t/teacher/essays.jsonl")
    assert len(rows) == paid and len(rows) % 5 == 0


def _prose_for_some(request: dict, key: str) -> str:
    """Every answer passes the gates (structure not required); 1 in 3 is two paragraphs without step
    markers, which the dataset cannot split into three steps (``dataset.infer_structure: off``)."""
    essay = default_reply(request, key)
    if sum(map(ord, key)) % 3:
        return essay
    return " ".join(essay.split()[:60]) + "\n\n" + " ".join(essay.split()[60:])


def test_the_draw_counts_only_essays_the_dataset_can_use(tmp_path, sample_dir, caplog):
    """The demo once stopped drawing at 29 accepted essays = 15 test charts, and the dataset, leaving out 2
    essays whose steps it could not read, made 14: the teacher counts what the dataset will keep."""
    with FakeLLM(reply=_prose_for_some) as llm:
        cfg, store = _setup(tmp_path, sample_dir, llm, "teacher.require_structure=false", "teacher.min_words=60",
                            "dataset.infer_structure=off")
        with caplog.at_level(logging.INFO):
            assert run_stage(cfg, store, "teacher") and run_stage(cfg, store, "dataset")
    summary = json.loads(store.get_text("t/teacher/_SUCCESS"))["summary"]
    assert summary["accepted"] > summary["usable"] > 0  # some accepted essays have no readable steps
    splits = store.get_json("t/dataset/splits.json")
    assert sum(s == "test" for s in splits.values()) == summary["test_charts"] >= 4
    assert f"{summary['usable']} with three steps the dataset can read" in caplog.text
