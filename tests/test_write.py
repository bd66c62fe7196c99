"""``ielts-distill write`` on the real tiny student (Idefics3 classes, PEFT adapters), and its error paths."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from pipeline.cli import main

TEXTS = ["The bar chart shows the share of people in 2010 and 2020.", "Overall, the figures rose steadily."] * 4


@pytest.fixture(scope="session")
def student(tmp_path_factory):
    """A tiny student, an adapter trained-looking (non-zero LoRA B) on it, and one built for another base."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    from pipeline.models import add_lora, build_tiny_student, load_student
    from pipeline.models.tiny import tiny_config

    root = tmp_path_factory.mktemp("write")
    base = build_tiny_student(root / "student", TEXTS)
    model, processor = load_student(base, device="cpu")
    peft = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a fresh LoRA is a no-op; this one changes the output
    peft.save_pretrained(root / "adapter")
    cfg = tiny_config(processor.tokenizer)
    cfg.text_config.hidden_size, cfg.text_config.head_dim = 96, 24
    other = add_lora(Idefics3ForConditionalGeneration(cfg), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    other.save_pretrained(root / "other-adapter")
    from PIL import Image

    Image.new("RGB", (160, 100), (30, 90, 200)).save(root / "chart.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root


def write(*args: str):
    result = CliRunner().invoke(main, ["write", *args, "--max-new-tokens", "12"])
    return result.exit_code, result.stdout, result.stderr


def test_base_only(student):
    code, out, err = write(str(student / "chart.png"), "--title", "Share of people", "--model", str(student / "student"))
    assert code == 0, err
    assert out.strip()
    # the random student never ends an essay within 12 tokens: the cut is said, not hidden
    assert err.strip() == "warning: the essay was cut at 12 new tokens (--max-new-tokens)"


def test_adapter_locates_its_base_and_changes_the_output(student):
    code, with_adapter, err = write(str(student / "chart.png"), "--title", "Share of people",
                                    "--adapter", str(student / "adapter"))
    assert code == 0, err
    _, base_only, _ = write(str(student / "chart.png"), "--title", "Share of people", "--model", str(student / "student"))
    assert with_adapter.strip() and with_adapter != base_only  # the LoRA weights were applied


@pytest.mark.parametrize("image, expected", [("missing.png", "image not found"),
                                             ("broken.png", "cannot decode image")])
def test_bad_image_is_one_line(student, image, expected):
    code, out, err = write(str(student / image), "--title", "T", "--adapter", str(student / "adapter"))
    assert code != 0 and out == ""
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1 and "Traceback" not in err


def test_image_over_max_pixels_is_refused_before_decoding(student):
    result = CliRunner().invoke(main, ["write", str(student / "chart.png"), "--title", "T", "--model",
                                       str(student / "student"), "--set", "data.max_pixels=1000"])
    assert result.exit_code != 0 and result.stdout == ""
    assert "160x100 px, more than data.max_pixels=1000" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("value", ["-5", "0"])
def test_max_new_tokens_must_be_positive(student, value):
    result = CliRunner().invoke(main, ["write", str(student / "chart.png"), "--title", "T", "--max-new-tokens", value])
    assert result.exit_code == 2 and "--max-new-tokens" in result.stderr and "Traceback" not in result.stderr


def test_adapter_for_another_base_is_one_line(student):
    code, _, err = write(str(student / "chart.png"), "--title", "T", "--adapter", str(student / "other-adapter"),
                         "--model", str(student / "student"))
    assert code != 0
    assert err.startswith("error: adapter ") and "does not fit base model" in err and err.count("\n") == 1


def test_adapter_with_unknown_modules_or_missing_base(student, tmp_path):
    renamed = shutil.copytree(student / "adapter", tmp_path / "renamed")
    cfg = json.loads((renamed / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["nonexistent_proj"]}))
    code, _, err = write(str(student / "chart.png"), "--title", "T", "--adapter", str(renamed))
    assert code != 0 and "does not fit base model" in err and "nonexistent_proj" in err

    orphan = shutil.copytree(student / "adapter", tmp_path / "orphan")
    (orphan / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "gone")}))
    code, _, err = write(str(student / "chart.png"), "--title", "T", "--adapter", str(orphan))
    assert code != 0 and "does not exist here; pass --model" in err

    code, _, err = write(str(student / "chart.png"), "--title", "T", "--adapter", str(tmp_path))
    assert code != 0 and "no adapter_config.json" in err


def test_adapter_and_base_in_s3(student, s3_bucket, tmp_path):
    """As finetune leaves them for the tiny student: the adapter's config names the base by its store URL."""
    from pipeline.store import open_store

    store = open_store(s3_bucket)
    store.upload_dir(student / "student", "demo/finetune/student")
    adapter = shutil.copytree(student / "adapter", tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = store.url("demo/finetune/student")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    store.upload_dir(adapter, "demo/finetune/unstructured/adapter")
    code, from_s3, err = write(str(student / "chart.png"), "--title", "Share of people",
                               "--adapter", store.url("demo/finetune/unstructured/adapter"))
    assert code == 0, err
    _, local, _ = write(str(student / "chart.png"), "--title", "Share of people", "--adapter", str(student / "adapter"))
    assert from_s3 == local
    code, _, err = write(str(student / "chart.png"), "--title", "T", "--adapter", store.url("demo/nothing-here"))
    assert code != 0 and err.startswith("error: nothing stored under")


# --------------------------------------------------------------------------- --data: the chart's data in the prompt


@pytest.fixture(scope="module")
def pipeline_charts(sample_dir, tmp_path_factory):
    """The sample's charts through the real ingest and dataset stages (``student.table_in_prompt``, teacher
    records faked) and generate's own reader: {chart_id: (image, title, data)} for the test split, the train
    split, and the sample's manifest rows (the raw files ``write`` gets)."""
    from test_dataset import ESSAY

    from pipeline import artifacts
    from pipeline.config import load_config
    from pipeline.context import StageContext
    from pipeline.stages import dataset, generate, ingest
    from pipeline.store import open_store

    uri = str(tmp_path_factory.mktemp("write-data") / "store")
    config = load_config(None, ["run.id=t", f"store.uri={uri}", f"data.source={sample_dir}", "data.stride=10",
                                "student.table_in_prompt=true", "dataset.train=0.15", "dataset.test=0.7"])
    store = open_store(uri)
    ingest.run(StageContext(config, store, "ingest"))
    charts = store.get_jsonl("t/ingest/charts.jsonl")
    store.put_jsonl("t/teacher/essays.jsonl", [
        {"chart_id": c["id"], "type": c["type"], "status": "accepted", "model": "teacher-x", "template": "bar.txt",
         "template_version": "v1", "essay": ESSAY.format(type=c["type"], title=c["title"], cid=c["id"])}
        for c in charts])
    StageContext(config, store, "teacher").complete({"accepted": len(charts)})
    dataset.run(StageContext(config, store, "dataset"))
    ctx = StageContext(config, store, "generate")
    manifest = {r["id"]: r for r in (json.loads(line) for line in (sample_dir / "manifest.jsonl").open())}
    return (generate.load_test_charts(ctx, artifacts.split_ids(ctx, "test")),
            artifacts.load_split(ctx, "structured", "train"), manifest)


@pytest.fixture(scope="module")
def data_adapter(student, pipeline_charts, tmp_path_factory):
    """The adapter, as finetune records it after training on rows with the chart's data."""
    from pipeline.models.loading import save_prompt_settings, trained_with_data

    folder = shutil.copytree(student / "adapter", tmp_path_factory.mktemp("data-adapter") / "adapter")
    save_prompt_settings(folder, pipeline_charts[1])
    assert trained_with_data(folder) is True
    return folder


def prompt_of(monkeypatch, *args: str) -> tuple[list[int], str]:
    """The prompt ids ``write`` encodes (a spy on the real ``encode``) and its stderr but the cut warning
    (one new token)."""
    from pipeline.models import chat

    real, seen = chat.encode, []
    monkeypatch.setattr(chat, "encode", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    result = CliRunner().invoke(main, ["write", *args, "--max-new-tokens", "1"])
    monkeypatch.setattr(chat, "encode", real)
    assert result.exit_code == 0 and result.stdout.strip(), result.stderr
    [encoded] = seen
    return encoded.input_ids, "".join(line for line in result.stderr.splitlines(keepends=True)
                                      if not line.startswith("warning: the essay was cut"))


def test_data_makes_generates_prompt_for_the_same_chart(student, sample_dir, pipeline_charts, data_adapter,
                                                        monkeypatch):
    """For a Statista chart (a 242-row CSV table) and a Pew chart (1,029 characters of OCR text) of generate's
    test split, ``write IMAGE --title T --data FILE`` on the sample's raw files encodes the prompt generate
    encodes for that chart."""
    from pipeline import models
    from pipeline.models.chat import encode
    from pipeline.models.loading import load_processor

    charts, _, manifest = pipeline_charts
    # per kind of data file, the test chart with the most data: both are cut (the student's limits)
    size = {cid: (sample_dir / manifest[cid]["data"]).stat().st_size for cid in charts}
    kinds = {manifest[cid]["data_format"]: cid for cid in sorted(charts, key=size.get)}
    assert kinds == {"csv_table": "statista-multi_col-5903", "ocr_text": "pew-multi_col-1200"}, kinds
    processor = load_processor(student / "student")
    for cid in kinds.values():
        image, title, data = charts[cid]
        assert data  # generate gives this chart's data
        row = manifest[cid]
        args = [str(sample_dir / row["image"]), "--title", row["title"], "--adapter", str(data_adapter),
                "--data", str(sample_dir / row["data"])]
        expected = encode(processor, image, title, data=data).input_ids
        ids, err = prompt_of(monkeypatch, *args)
        assert ids == expected, cid
        assert "warning" not in err
    # a write that drops the data before generating builds another prompt: the comparison catches it
    real = models.generate_essays
    monkeypatch.setattr(models, "generate_essays", lambda m, p, items, **kw: real(m, p, [c[:2] for c in items], **kw))
    assert prompt_of(monkeypatch, *args)[0] != expected


def test_adapter_trained_with_data_needs_it(student, data_adapter):
    code, out, err = write(str(student / "chart.png"), "--title", "T", "--adapter", str(data_adapter))
    assert code != 0 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: --adapter {data_adapter} was trained with the chart's data") and "--data FILE" in err


def test_data_for_a_model_trained_without_it(student, sample_dir, tmp_path, monkeypatch):
    """Used as asked: the base as generate's baseline gets it, an adapter recorded without it with a warning;
    an adapter that records nothing (saved before finetune recorded it) as the base."""
    from datasets import Dataset

    from pipeline.models.loading import save_prompt_settings, trained_with_data

    plain = shutil.copytree(student / "adapter", tmp_path / "plain")
    save_prompt_settings(plain, Dataset.from_dict({"title": ["a", "b"], "data": ["", ""]}))
    assert trained_with_data(plain) is False and trained_with_data(student / "adapter") is None
    chart, csv = str(student / "chart.png"), str(sample_dir / "data" / "statista-multi_col-131.csv")
    without = prompt_of(monkeypatch, chart, "--title", "T", "--adapter", str(plain))[0]
    ids, err = prompt_of(monkeypatch, chart, "--title", "T", "--adapter", str(plain), "--data", csv)
    assert len(ids) > len(without) + 20  # the table is in the prompt
    assert err.strip() == f"warning: --adapter {plain} was trained without the chart's data in its prompt; " \
        "--data is used anyway"
    for model in (["--model", str(student / "student")], ["--adapter", str(student / "adapter")]):
        assert prompt_of(monkeypatch, chart, "--title", "T", *model, "--data", csv) == (ids, ""), model


@pytest.mark.parametrize("content, expected", [(None, "file not found"), (b"\xff\xfe\x00garbage", "unreadable"),
                                               (b"Year,Sales\n", "no data rows"), (b"  \n", "holds no text")])
def test_bad_data_file_is_one_line(student, data_adapter, tmp_path, content, expected):
    path = tmp_path / ("chart.txt" if expected == "holds no text" else "chart.csv")
    if content is not None:
        path.write_bytes(content)
    code, out, err = write(str(student / "chart.png"), "--title", "T", "--adapter", str(data_adapter),
                           "--data", str(path))
    assert code != 0 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: --data {path}: ") and expected in err
