"""The student on real transformers/PEFT classes: the tiny Idefics3 student, chat formatting and label
masking, LoRA on the text model only, adapter save/reload, batched vs one-by-one greedy generation."""

from __future__ import annotations

import pytest
import torch
from student_fixtures import sample_charts, sample_rows

from pipeline.models import (
    IGNORE_INDEX,
    add_lora,
    collate,
    encode,
    generate_essays,
    load_student,
    user_prompt,
)
from pipeline.models.chat import answer_text, prompt_text
from pipeline.models.tiny import IMAGE_SEQ_LEN, IMAGE_TOKENS


def test_tiny_student_reloads_with_auto_classes(tiny_student, tiny_loaded):
    model, processor = tiny_loaded
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert type(processor).__name__ == "Idefics3Processor"
    assert type(processor.image_processor).__name__ == "Idefics3ImageProcessorPil"
    assert processor.image_seq_len == IMAGE_SEQ_LEN == 4
    assert model.config.text_config.num_hidden_layers == 2 and model.config.text_config.hidden_size == 64
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config._attn_implementation == "sdpa"
    assert processor.chat_template and (tiny_student / "model.safetensors").is_file()
    assert model.num_parameters() < 1_000_000


def test_special_tokens_are_single_ids(tiny_loaded):
    _, processor = tiny_loaded
    tok = processor.tokenizer
    ids = {}
    for token in [*IMAGE_TOKENS, "<end_of_utterance>", "<|im_start|>"]:
        encoded = tok(token, add_special_tokens=False)["input_ids"]
        assert len(encoded) == 1, token
        ids[token] = encoded[0]
    assert len(set(ids.values())) == len(ids)
    assert processor.image_token_id == ids["<image>"] == tiny_loaded[0].config.image_token_id


def test_prompt_holds_image_title_and_instruction(tiny_loaded, sample_dir):
    _, processor = tiny_loaded
    [(image, title)] = sample_charts(sample_dir, 1)
    prompt = prompt_text(processor, title)
    assert prompt.startswith("<|im_start|>User:<image>") and prompt.endswith("<end_of_utterance>\nAssistant:")
    assert user_prompt(title) in prompt and title in user_prompt(title)
    assert answer_text(processor, title, "An essay.") == " An essay.<end_of_utterance>"
    enc = encode(processor, image, title)
    text = processor.tokenizer.decode(enc.input_ids)
    assert "<global-img>" in text and "<row_1_col_1>" in text  # split into tiles plus the global view
    n_tiles = enc.pixel_values.shape[0]
    assert enc.input_ids.count(processor.image_token_id) == n_tiles * IMAGE_SEQ_LEN


def test_label_masking_keeps_only_assistant_tokens(tiny_loaded, sample_dir):
    model, processor = tiny_loaded
    (img_a, title_a), (img_b, title_b) = sample_charts(sample_dir, 2)
    essay = "The chart shows a steady rise. Overall, values doubled."
    a, b = encode(processor, img_a, title_a, essay), encode(processor, img_b, title_b, "Short one.")
    answer = processor.tokenizer(answer_text(processor, title_a, essay), add_special_tokens=False)["input_ids"]
    prompt_len = len(encode(processor, img_a, title_a))
    assert a.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len  # prompt and image tokens masked
    assert a.labels[prompt_len:] == a.input_ids[prompt_len:] == answer
    assert processor.tokenizer.decode(a.labels[prompt_len:]).strip() == essay + "<end_of_utterance>"

    batch = collate([a, b], processor.tokenizer.pad_token_id)
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == IGNORE_INDEX).all()  # padding masked
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == len(answer) + (len(b) - len(encode(processor, img_b, title_b)))

    # the model's loss is the mean over exactly these tokens: changing a masked position's label-free
    # content (the title) does not matter for which tokens count, and the manual loss agrees
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(out.loss, manual, atol=1e-5)


def test_prompt_longer_than_max_length_is_one_line_error(tiny_loaded, sample_dir):
    _, processor = tiny_loaded
    [(image, title)] = sample_charts(sample_dir, 1)
    with pytest.raises(ValueError, match=r"prompt of \d+ tokens .* exceeds max_length=16"):
        encode(processor, image, title, "essay", max_length=16)
    long = encode(processor, image, title, "word " * 400, max_length=300)
    assert len(long) == len(long.labels) == 300


def test_lora_targets_text_model_only_and_lowers_loss(tiny_student, sample_dir):
    model, processor = load_student(tiny_student, device="cpu")
    model = add_lora(model, r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora_names and all("text_model" in n and "lora_" in n for n in lora_names)
    assert not any("vision" in n or "connector" in n for n in lora_names)
    rows = sample_rows(sample_dir)[:4]
    charts = sample_charts(sample_dir, 4)
    batch = collate([encode(processor, img, t, " ".join(r["summary"].split()[:40]))
                     for (img, t), r in zip(charts, rows)], processor.tokenizer.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses


def test_adapter_save_reload_gives_identical_logits(tiny_student, sample_dir, tmp_path):
    model, processor = load_student(tiny_student, device="cpu")
    model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "o_proj"])
    with torch.no_grad():  # a trained-looking adapter: non-zero B
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    charts = sample_charts(sample_dir, 2)
    batch = collate([encode(processor, img, t, "An essay.") for img, t in charts], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded, _ = load_student(tiny_student, adapter=tmp_path / "adapter", device="cpu")
    plain, _ = load_student(tiny_student, device="cpu")
    with torch.no_grad():
        got = reloaded(**batch).logits
        without = plain(**batch).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(without, expected, atol=1e-3)  # the adapter does change the model


def test_batched_generation_equals_one_by_one(tiny_loaded, sample_dir):
    model, processor = tiny_loaded
    charts = sample_charts(sample_dir, 10)
    batched = generate_essays(model, processor, charts, max_new_tokens=16, batch_size=4)
    single = generate_essays(model, processor, charts, max_new_tokens=16, batch_size=1)
    from pipeline.models.features import ChartCache

    cache, keys = ChartCache("t"), [f"c{i}" for i in range(len(charts))]
    shared = generate_essays(model, processor, charts, max_new_tokens=16, batch_size=3, sort_by_length=False,
                             cache=cache, keys=keys)
    assert len(cache.prompts) == len(charts)  # a second model of this base reuses prompts and features
    again = generate_essays(model, processor, charts, max_new_tokens=16, batch_size=4, cache=cache, keys=keys)
    assert [r.text for r in batched] == [r.text for r in single] == [r.text for r in shared] == \
        [r.text for r in again]
    assert [r.tokens for r in batched] == [r.tokens for r in single]
    assert [r.ids for r in batched] == [r.ids for r in single] and all(len(r.ids) == r.tokens for r in batched)
    assert all(0 < r.tokens <= 16 and r.seconds > 0 for r in batched)
    # an essay is "length" exactly when it ran to the limit without a stop token
    assert [r.finish for r in batched] == [r.finish for r in single]
    assert all((r.finish == "length") == (r.tokens == 16) for r in batched)

    # token for token: the ids the batched path produced equal HF generate run on each prompt alone
    tok = processor.tokenizer
    for (image, title), result in zip(charts[:3], batched[:3]):
        enc = encode(processor, image, title)
        inputs = collate([enc], tok.pad_token_id, side="left")
        inputs.pop("labels")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=[tok.eos_token_id],
                                 pad_token_id=tok.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert tok.decode(new, skip_special_tokens=True).strip() == result.text


def test_finished_rows_leave_the_batch_and_the_others_go_on_unchanged(tiny_loaded, sample_dir, monkeypatch):
    """Every SHRINK_EVERY new tokens the rows that ended their essay leave the batch and the others continue
    from their KV cache: the same tokens as one generate call over the whole limit (repetition penalty and
    min_new_tokens included), and at the last call only the rows that run to the limit are left."""
    from pipeline.models import generation

    model, processor = tiny_loaded
    charts = sample_charts(sample_dir, 10)
    sizes, real = [], model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: sizes.append(k["input_ids"].shape[0]) or real(*a, **k))
    settings = {"max_new_tokens": 40, "batch_size": 10, "repetition_penalty": 1.3, "min_new_tokens": 2}
    monkeypatch.setattr(generation, "SHRINK_EVERY", 10**6)
    whole = generate_essays(model, processor, charts, **settings)
    assert sizes == [10] and {r.finish for r in whole} == {"stop", "length"}  # both kinds of rows
    sizes.clear()
    monkeypatch.setattr(generation, "SHRINK_EVERY", 3)
    shrunk = generate_essays(model, processor, charts, **settings)
    assert [(r.ids, r.finish, r.text) for r in shrunk] == [(r.ids, r.finish, r.text) for r in whole]
    assert len(sizes) == 14 and sizes[0] == 10 and sizes[-1] == sum(r.finish == "length" for r in whole) < 10


def test_results_come_back_in_caller_order(tiny_loaded, sample_dir):
    model, processor = tiny_loaded
    charts = sample_charts(sample_dir, 5)
    seen = []
    forward = generate_essays(model, processor, charts, max_new_tokens=6, batch_size=2,
                              on_batch=lambda idx, res: seen.extend(idx))
    backward = generate_essays(model, processor, charts[::-1], max_new_tokens=6, batch_size=2)
    assert sorted(seen) == list(range(5))
    assert [r.text for r in forward] == [r.text for r in backward][::-1]


def test_finish_says_whether_the_model_stopped_or_hit_the_limit():
    from pipeline.models.generation import finish_of

    assert finish_of([5, 6, 2, 7], stops=[2, 9]) == (2, "stop")
    assert finish_of([9], stops=[2, 9]) == (0, "stop")
    assert finish_of([5, 6, 7], stops=[2, 9]) == (3, "length")


def test_transparent_charts_are_composited_on_white(tiny_loaded):
    """A chart with a transparent background reads as the same chart on white (not on black), in every
    mode PIL gives a transparent PNG."""
    from PIL import Image

    from pipeline.models.images import to_rgb

    _, processor = tiny_loaded
    on_white = Image.new("RGB", (120, 80), (255, 255, 255))
    on_white.paste((200, 30, 30), (20, 20, 60, 80))
    rgba = Image.new("RGBA", (120, 80), (0, 0, 0, 0))  # transparent black, as many plotting tools write it
    rgba.paste((200, 30, 30, 255), (20, 20, 60, 80))
    palette = rgba.convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    for image in (rgba, rgba.convert("LA"), palette):
        assert to_rgb(image).mode == "RGB" and to_rgb(image).getpixel((0, 0)) == (255, 255, 255), image.mode
    assert to_rgb(rgba).tobytes() == on_white.tobytes()
    assert torch.equal(encode(processor, rgba, "T").pixel_values, encode(processor, on_white, "T").pixel_values)
    assert not torch.equal(encode(processor, rgba.convert("RGB"), "T").pixel_values,
                           encode(processor, on_white, "T").pixel_values)  # what plain convert("RGB") gave


def test_image_resolution_defaults_to_the_checkpoints_own(tiny_student):
    """``student.image_longest_edge`` unset (the default, and in configs/cluster.yaml) keeps the checkpoint's
    own resolution; a value overrides it."""
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.models.loading import load_processor

    own = load_processor(tiny_student).image_processor.size["longest_edge"]
    assert load_processor(tiny_student, None).image_processor.size["longest_edge"] == own
    assert load_processor(tiny_student, own * 2).image_processor.size["longest_edge"] == own * 2
    cluster = Path(__file__).parents[1] / "configs" / "cluster.yaml"
    assert load_config(None, []).student.image_longest_edge is None
    assert load_config(cluster).student.image_longest_edge is None


@pytest.mark.parametrize("train_connector", [False, True])
def test_cached_features_and_answer_only_loss_equal_the_full_forward(tiny_student, sample_dir, train_connector):
    """The trainer's step (vision features from the ChartCache, LM head at answer positions only) gives the
    loss of the model's own forward on pixels with -100 labels, and the same LoRA gradients; with
    ``train_connector`` the cache holds the tower's output, and the connector gets the same gradients too."""
    from pipeline.models.features import ChartCache
    from pipeline.models.training import Collate, Samples, answer_loss

    model, processor = load_student(tiny_student, device="cpu")
    model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                     train_connector=train_connector)
    assert any("connector" in k for k, p in model.named_parameters() if p.requires_grad) == train_connector
    rows = [{"chart_id": f"c{i}", "image": image, "title": title, "essay": r["summary"]}
            for i, ((image, title), r) in enumerate(zip(sample_charts(sample_dir, 4), sample_rows(sample_dir)))]
    cache = ChartCache("t", before_connector=train_connector)
    samples = Samples(rows, processor, cache, model, max_length=512)
    assert len(cache.prompts) == 4 and samples.lengths == [len(s.input_ids) for s in samples.items]
    batch = Collate(processor.tokenizer.pad_token_id)([samples[i] for i in range(4)])
    cached, n = answer_loss(model, batch, torch.device("cpu"), torch.float32)
    (cached / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    full = collate([encode(processor, r["image"], r["title"], r["essay"], 512) for r in rows],
                   processor.tokenizer.pad_token_id)
    assert torch.equal(full["input_ids"], batch["input_ids"]) and torch.equal(full["labels"], batch["labels"])
    reference = model(**full, use_cache=False).loss
    reference.backward()
    assert float(cached / n) == pytest.approx(float(reference), rel=1e-5)
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[k], p.grad, rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_trains_bf16_weights_on_a_cpu_that_has_it(native, tiny_student, sample_dir, tmp_path, caplog,
                                                           monkeypatch):
    """finetune.cpu_bf16: where the CPU multiplies bf16 natively (AMX or AVX512-BF16; both answers forced
    here, so either CPU runs both paths) the frozen weights load in bf16, the LoRA adapters stay fp32 and the
    loss stays within bf16 rounding of fp32's; elsewhere it says so and trains in fp32. The finetune stage
    honours the key (its log names the precision) and saves fp32 adapters."""
    from safetensors.torch import load_file
    from student_fixtures import stage_ctx, student_config, write_dataset

    from pipeline.models import loading
    from pipeline.models.features import ChartCache
    from pipeline.models.training import Collate, Samples, answer_loss
    from pipeline.stages import finetune
    from pipeline.store import open_store

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    assert loading.cpu_has_bf16() == native
    want = torch.bfloat16 if native else torch.float32
    assert loading.pick_dtype("cpu", cpu_bf16=True) == want and loading.pick_dtype("cpu") == torch.float32
    cpu = torch.device("cpu")
    rows = [{"chart_id": f"c{i}", "image": image, "title": title, "essay": r["summary"]}
            for i, ((image, title), r) in enumerate(zip(sample_charts(sample_dir, 4), sample_rows(sample_dir)))]
    losses, seen = {}, []
    for cpu_bf16 in (False, True):
        model, processor = load_student(tiny_student, device="cpu", cpu_bf16=cpu_bf16)
        model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        batch = Collate(processor.tokenizer.pad_token_id)(list(Samples(rows, processor, ChartCache("t"), model, 512)))
        seen.clear()
        model.base_model.model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
        with torch.no_grad():
            losses[cpu_bf16], n = answer_loss(model, batch, cpu, model.dtype)
        assert seen == [want if cpu_bf16 else torch.float32] and losses[cpu_bf16].dtype == torch.float32
    assert float(losses[True] / n) == pytest.approx(float(losses[False] / n), rel=2e-2)

    config = student_config(str(tmp_path / "s"), finetune__max_steps=1, finetune__cpu_bf16=True,
                            finetune__variants="[unstructured]")
    write_dataset(open_store(config.store.uri), "t", sample_dir, sizes=(4, 2, 2))
    caplog.set_level("INFO", logger="ielts_distill")
    finetune.run(stage_ctx(config, "finetune"))
    assert ("trainable LoRA parameters on cpu (bfloat16)" in caplog.text) == native
    assert ("this CPU has no native bf16 (AMX or AVX512-BF16); training in float32" in caplog.text) == (not native)
    [weights] = (tmp_path / "s" / "t" / "finetune" / "unstructured" / "adapter").glob("*.safetensors")
    assert {t.dtype for t in load_file(weights).values()} == {torch.float32}


def test_trained_connector_is_saved_with_the_adapter_and_used_by_shared_generation(tiny_student, sample_dir,
                                                                                   tmp_path):
    """finetune.train_connector: the connector trains, is saved with the adapter (the base keeps its own),
    and generation from one tower-level cache shared by the baseline and the adapter gives each model the
    essays it writes on its own from pixels."""
    from pipeline.models.features import ChartCache
    from pipeline.models.training import Collate, Samples, answer_loss

    model, processor = load_student(tiny_student, device="cpu")
    base_connector = {k: v.clone() for k, v in model.model.connector.state_dict().items()}
    model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], train_connector=True)
    rows = [{"chart_id": f"c{i}", "image": image, "title": title, "essay": r["summary"]}
            for i, ((image, title), r) in enumerate(zip(sample_charts(sample_dir, 4), sample_rows(sample_dir)))]
    samples = Samples(rows, processor, ChartCache("t", before_connector=True), model, max_length=512)
    batch = Collate(processor.tokenizer.pad_token_id)([samples[i] for i in range(4)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        loss, n = answer_loss(model, batch, torch.device("cpu"), torch.float32)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "adapter")

    charts = [(r["image"], r["title"]) for r in rows]
    tuned, _ = load_student(tiny_student, adapter=tmp_path / "adapter", device="cpu", merge=True)
    plain, _ = load_student(tiny_student, device="cpu")
    trained = tuned.model.connector.state_dict()
    assert not all(torch.equal(trained[k], v) for k, v in base_connector.items())  # trained and reloaded
    assert all(torch.equal(plain.model.connector.state_dict()[k], v) for k, v in base_connector.items())
    cache, keys = ChartCache("shared", before_connector=True), [r["chart_id"] for r in rows]
    for m in (plain, tuned):
        shared = generate_essays(m, processor, charts, max_new_tokens=12, batch_size=4, cache=cache, keys=keys)
        alone = generate_essays(m, processor, charts, max_new_tokens=12, batch_size=1)
        assert [r.ids for r in shared] == [r.ids for r in alone]
    assert [r.ids for r in generate_essays(plain, processor, charts, max_new_tokens=12, batch_size=4)] != \
        [r.ids for r in generate_essays(tuned, processor, charts, max_new_tokens=12, batch_size=4)]


def test_repetition_penalty_counts_the_essay_not_the_prompt(tiny_loaded, sample_dir):
    """generate.repetition_penalty decodes as transformers' RepetitionPenaltyLogitsProcessor over the
    generated tokens only: a token of the prompt (a digit of a year in the title, a title word) is not
    penalised, so the first token is the unpenalised one whatever the penalty."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    model, processor = tiny_loaded
    tok = processor.tokenizer
    charts = sample_charts(sample_dir, 6)
    plain = generate_essays(model, processor, charts, max_new_tokens=24, batch_size=1)
    penalised = generate_essays(model, processor, charts, max_new_tokens=24, batch_size=1, repetition_penalty=5.0)
    assert [r.ids[:1] for r in penalised] == [r.ids[:1] for r in plain]
    assert [r.ids for r in penalised] != [r.ids for r in plain]
    prompts = [encode(processor, image, title) for image, title in charts]
    # the old behaviour (the prompt counted) changes some first token: the test can tell the two apart
    assert any(r.ids[0] in p.input_ids for r, p in zip(plain, prompts))
    for (image, title), result in zip(charts, penalised):
        inputs = collate([encode(processor, image, title)], tok.pad_token_id, side="left")
        inputs.pop("labels")
        length = inputs["input_ids"].shape[1]
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=[tok.eos_token_id],
                                 pad_token_id=tok.pad_token_id,
                                 logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(5.0, length)]))
        new = out[0, length:].tolist()
        assert result.ids == new[:len(result.ids)]
