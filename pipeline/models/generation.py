"""Batched generation with identical settings for every model (baseline and adapters).

How a batch is run (greedy, the default):
1. prompts are encoded once and sorted by length, so a batch holds prompts of similar length;
2. the batch is prefilled (in micro-batches of ``prefill_batch`` when memory is short), with position ids
   counting real tokens only, so left padding does not shift the rotary positions;
3. the micro-batches' KV caches are left-padded to one length and stacked, and the whole batch decodes
   together with ``model.generate`` (the attention mask hides the padding).
Greedy outputs equal one-by-one generation token for token (tests/test_models.py). Sampling
(``do_sample``) uses one plain ``generate`` call per batch. Results come back in the caller's order.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.models.chat import Encoded, collate, encode, pad_token_id


@dataclass
class GenerationResult:
    text: str
    tokens: int  # generated tokens, the end-of-utterance token excluded
    seconds: float  # this item's share of its batch's wall time
    finish: str = "stop"  # "stop": the model ended the essay; "length": cut at max_new_tokens


def finish_of(row: list[int], stops: list[int]) -> tuple[int, str]:
    """(tokens before the first stop token, "stop"), or (all of them, "length") when the model never
    stopped (generation ran to ``max_new_tokens``)."""
    cut = next((n for n, t in enumerate(row) if t in stops), None)
    return (cut, "stop") if cut is not None else (len(row), "length")


def stop_ids(processor) -> list[int]:
    tok = processor.tokenizer
    ids = {tok.convert_tokens_to_ids("<end_of_utterance>"), tok.eos_token_id}
    return sorted(i for i in ids if i is not None and i != tok.unk_token_id)


def _base(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_kwarg(model) -> str:
    """``cache`` in recent transformers 5.x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(_base(model).forward).parameters else "past_key_values"


def _to_device(batch: dict[str, Any], model) -> dict[str, Any]:
    device = next(model.parameters()).device
    out = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    out["pixel_values"] = out["pixel_values"].to(model.dtype)
    return out


def _left_pad(t, length: int, dim: int, value: float = 0):
    import torch.nn.functional as F

    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [missing, 0]  # F.pad lists dims from the last one backwards
    return F.pad(t, pad, value=value)


def _prefill(model, items: list[Encoded], pad_id: int, micro: int):
    """Run the prompts in micro-batches; return (input ids, attention mask, stacked cache, first tokens)."""
    import torch
    from transformers import DynamicCache

    parts = []
    for start in range(0, len(items), micro):
        batch = _to_device(collate(items[start:start + micro], pad_id, side="left"), model)
        # positions count real tokens only, as generate's own do: left padding must not shift RoPE
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        out = model(**batch, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values
        parts.append((batch["input_ids"], batch["attention_mask"], [tuple(layer[:2]) for layer in cache],
                      out.logits[:, -1].argmax(-1)))
    width = max(p[0].shape[1] for p in parts)
    ids = torch.cat([_left_pad(p[0], width, 1, pad_id) for p in parts])
    mask = torch.cat([_left_pad(p[1], width, 1) for p in parts])
    layers = [(torch.cat([_left_pad(p[2][n][0], width, 2) for p in parts]),
               torch.cat([_left_pad(p[2][n][1], width, 2) for p in parts])) for n in range(len(parts[0][2]))]
    cache = DynamicCache(ddp_cache_data=layers, config=_base(model).config)
    return ids, mask, cache, torch.cat([p[3] for p in parts])


def _generate_batch(model, items: list[Encoded], *, pad_id: int, stops: list[int], max_new_tokens: int,
                    do_sample: bool, prefill_batch: int) -> list[list[int]]:
    """New token ids per item (stop tokens and what follows them included)."""
    import torch

    common = {"eos_token_id": stops, "pad_token_id": pad_id}
    if do_sample:
        batch = _to_device(collate(items, pad_id, side="left"), model)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True, **common)
        return out[:, batch["input_ids"].shape[1]:].tolist()
    kwarg = _cache_kwarg(model)
    ids, mask, cache, first = _prefill(model, items, pad_id, prefill_batch)
    if max_new_tokens == 1:
        return first[:, None].tolist()
    ids = torch.cat([ids, first[:, None]], dim=1)
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    out = model.generate(input_ids=ids, attention_mask=mask, **{kwarg: cache}, max_new_tokens=max_new_tokens - 1,
                         do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, **common)
    return out[:, ids.shape[1] - 1:].tolist()


def generate_essays(model, processor, charts: Sequence[tuple[Any, str]], *, max_new_tokens: int,
                    batch_size: int, do_sample: bool = False, sort_by_length: bool = True,
                    prefill_batch: int | None = None,
                    on_batch: Callable[[list[int], list[GenerationResult]], None] | None = None
                    ) -> list[GenerationResult]:
    """One essay per ``(PIL image, title)``, greedy unless ``do_sample``. ``prefill_batch`` (default: the
    whole batch) prefills a batch in smaller micro-batches, which bounds prefill memory. ``on_batch(indices, results)`` runs after each batch (indices into
    ``charts``), so a caller can store results as they come."""
    import torch

    tok = processor.tokenizer
    pad_id = pad_token_id(processor)
    stops = stop_ids(processor)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # PIL resizes without the GIL
        encoded = list(pool.map(lambda chart: encode(processor, *chart), charts))
    prefill_batch = prefill_batch or batch_size
    order = list(range(len(charts)))
    if sort_by_length:
        order.sort(key=lambda i: len(encoded[i]))
    results: list[GenerationResult | None] = [None] * len(charts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        started = time.perf_counter()
        with torch.inference_mode():
            rows = _generate_batch(model, [encoded[i] for i in idx], pad_id=pad_id, stops=stops,
                                   max_new_tokens=max_new_tokens, do_sample=do_sample, prefill_batch=prefill_batch)
        seconds = (time.perf_counter() - started) / len(idx)
        done = []
        for i, row in zip(idx, rows):
            cut, finish = finish_of(row, stops)
            results[i] = GenerationResult(tok.decode(row[:cut], skip_special_tokens=True).strip(), cut, seconds,
                                          finish)
            done.append(results[i])
        if on_batch is not None:
            on_batch(idx, done)
    return results  # type: ignore[return-value]
