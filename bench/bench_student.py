"""Student benchmarks, ratios from one run:

1. batched vs one-by-one greedy generation on the tiny student, 64 charts (target >= 4x, identical output);
2. the same on a random model with SmolVLM-256M's real shapes, 16 charts x 48 new tokens on CPU
   (target >= 2.5x; plain HF generate on a left-padded batch is shown for reference);
3. padding efficiency of the length-grouped training batches on the bundled sample (target >= 0.9);
4. ``--device cuda``: LoRA training throughput and MFU on SmolVLM-256M's shapes (bf16, batch 6).

    .venv/bin/python bench/bench_student.py [--skip-256m] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

from common import sample_charts, sample_rows, sample_texts, smolvlm_256m_like, timed, tiny_student_dir


def compare_batched(model, processor, charts, *, max_new_tokens: int, batch_size: int, plain: bool,
                    rounds: int) -> dict:
    """Wall time of one-by-one, batched and (``plain``) plain-HF-style batched generation. The machine is
    shared, so the three are interleaved for ``rounds`` rounds and each keeps its fastest round (noise only
    ever adds time)."""
    from pipeline.models import generate_essays

    def run(bs, **kw):
        return generate_essays(model, processor, charts, max_new_tokens=max_new_tokens, batch_size=bs, **kw)

    variants = {"one_by_one": lambda: run(1), "batched": lambda: run(batch_size)}
    if plain:  # one padded prefill of the batch in arrival order, then generate: what plain HF batching does
        variants["plain_hf"] = lambda: run(batch_size, sort_by_length=False)
    run(min(batch_size, len(charts)))  # warm-up (allocator, kernels)
    best, texts = {}, {}
    for _ in range(rounds):
        for name, fn in variants.items():
            out, seconds = timed(fn)
            best[name] = min(best.get(name, seconds), seconds)
            texts.setdefault(name, [r.text for r in out])
    out = {"one_by_one_s": best["one_by_one"], "batched_s": best["batched"],
           "speedup": best["one_by_one"] / best["batched"], "identical": texts["batched"] == texts["one_by_one"]}
    if plain:
        out.update(plain_hf_s=best["plain_hf"], plain_hf_speedup=best["one_by_one"] / best["plain_hf"],
                   plain_identical=texts["plain_hf"] == texts["one_by_one"])
    return out


def padding_report(batch_sizes=(4, 6)) -> dict:
    """Length-grouped batches over the sample's 120 charts (human summaries as the essays)."""
    from pipeline.models import encode, load_student
    from pipeline.models.training import padding_efficiency, plan_batches
    from PIL import Image

    from common import SAMPLE

    _, processor = load_student(tiny_student_dir(), device="cpu")
    lengths = [len(encode(processor, Image.open(SAMPLE / r["image"]).convert("RGB"), r["title"], r.get("summary") or ""))
               for r in sample_rows()]
    report = {}
    for bs in batch_sizes:
        grouped = [padding_efficiency(plan_batches(lengths, bs, seed=42, epoch=e), lengths) for e in range(3)]
        naive = padding_efficiency([list(range(k, min(k + bs, len(lengths)))) for k in range(0, len(lengths), bs)],
                                   lengths)
        report[bs] = {"grouped": min(grouped), "arrival_order": naive}
    return report


def lora_throughput_cuda(steps: int = 20, batch_size: int = 6, tiles: int = 5, essay_tokens: int = 320) -> dict:
    """LoRA (r=16, text model attention + MLP) training steps on SmolVLM-256M's shapes, bf16, SDPA,
    gradient checkpointing; synthetic inputs of the real size: ``tiles`` 512-px tiles per chart (2x2 +
    global, 64 tokens each) and an ``essay_tokens`` answer. MFU counts model FLOPs: text 4*N per token
    (forward + input gradients; the frozen base has no weight gradients) plus LoRA's 6*N_lora, vision
    forward 2*N per patch, against the GPU's dense bf16 peak."""
    import torch

    from pipeline.models import add_lora

    model, processor = smolvlm_256m_like(device="cuda", dtype=torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    model = add_lora(model, r=16, alpha=32, dropout=0.05,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    image_id = processor.image_token_id
    prompt = 60
    seq = prompt + tiles * (64 + 3) + essay_tokens
    ids = torch.randint(100, 500, (batch_size, seq), device="cuda")
    for t in range(tiles):  # image token runs where the processor puts them
        start = 1 + t * 67
        ids[:, start + 2:start + 66] = image_id
    labels = ids.clone()
    labels[:, :seq - essay_tokens] = -100
    pixels = torch.randn(batch_size, tiles, 3, 512, 512, device="cuda", dtype=torch.bfloat16)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    base = model.get_base_model()
    n_text = sum(p.numel() for p in base.model.text_model.parameters()) + base.lm_head.weight.numel()
    n_vision = sum(p.numel() for p in base.model.vision_model.parameters())
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = batch_size * (seq * (4 * n_text + 6 * n_lora) + tiles * 1024 * 2 * n_vision)
    peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
    name = torch.cuda.get_device_name()
    peak_flops = next((v for k, v in peak.items() if k in name), 989e12)
    return {"gpu": name, "step_s": seconds, "samples_per_s": batch_size / seconds,
            "tokens_per_s": batch_size * seq / seconds, "mfu": flops / seconds / peak_flops,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "seq_len": seq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--skip-256m", action="store_true", help="skip the SmolVLM-256M-shaped CPU generation")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds for the 256M model")
    args = parser.parse_args()
    import torch

    from pipeline.models import load_student

    if args.device == "cuda":
        r = lora_throughput_cuda()
        print(f"LoRA training on SmolVLM-256M shapes ({r['gpu']}, bf16, batch 6, seq {r['seq_len']}): "
              f"{r['step_s'] * 1000:.0f} ms/step, {r['samples_per_s']:.1f} samples/s, {r['tokens_per_s']:,.0f} "
              f"tokens/s, MFU {r['mfu']:.1%} (target >= 40%), peak memory {r['peak_memory_gib']:.1f} GiB")
        return

    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the generate stage runs the tiny student (2 threads only add sync costs)
    model, processor = load_student(tiny_student_dir(), device="cpu")
    r = compare_batched(model, processor, sample_charts(64), max_new_tokens=48, batch_size=16, plain=True,
                        rounds=3)
    results.append(("tiny student, 64 charts x 48 tokens, batch 16, 1 CPU thread", r, 4.0))
    torch.set_num_threads(threads)
    if not args.skip_256m:
        model, processor = smolvlm_256m_like()
        n = sum(p.numel() for p in model.parameters())
        r = compare_batched(model, processor, sample_charts(16), max_new_tokens=48, batch_size=16, plain=True,
                            rounds=args.rounds)
        results.append((f"SmolVLM-256M shapes ({n / 1e6:.0f}M params, 64 visual tokens), 16 charts x 48 tokens, "
                        f"{threads} CPU threads", r, 2.5))
    pad = padding_report()

    print()
    ok = True
    for label, r, target in results:
        passed = r["speedup"] >= target and r["identical"]
        ok &= passed
        extra = (f"; plain HF-style batch (one padded prefill) {r['plain_hf_s']:.1f}s = {r['plain_hf_speedup']:.2f}x "
                 f"(identical: {r['plain_identical']})" if "plain_hf_s" in r else "")
        print(f"{label}: one-by-one {r['one_by_one_s']:.1f}s, batched {r['batched_s']:.1f}s -> "
              f"{r['speedup']:.2f}x (target >= {target}x), identical outputs: {r['identical']}{extra} "
              f"[{'ok' if passed else 'BELOW TARGET'}]")
    for bs, p in pad.items():
        passed = p["grouped"] >= 0.9
        ok &= passed
        print(f"padding efficiency, sample (120 charts), batch {bs}: length-grouped {p['grouped']:.3f} "
              f"(arrival order {p['arrival_order']:.3f}; target >= 0.9) [{'ok' if passed else 'BELOW TARGET'}]")
    print("LoRA throughput / MFU on SmolVLM-256M shapes: run with --device cuda on a GPU machine")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
