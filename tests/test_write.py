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
