"""Batched generation with identical settings for every model (baseline and adapters).

How a batch is run: the charts are encoded and their frozen vision features computed once
(``features.ChartCache``, shared between the models of one base), the prompts sorted by length so a
batch holds prompts of similar length, and each batch is left-padded ``model.generate`` calls fed the
cached features (``mm_encoder_outputs``) instead of pixels, ``SHRINK_EVERY`` new tokens at a time: the rows
that ended their essay leave and the others go on from their KV cache. Greedy outputs equal one-by-one generation
token for token (tests/test_models.py). Results come back in the caller's order. (A hand-written
prefill-and-stack loop was measured no faster than ``generate`` and was dropped: docs/training.md.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.models.chat import collate, pad_token_id
from pipeline.models.features import ChartCache


@dataclass
class GenerationResult:
    text: str
    tokens: int  # generated tokens, the end-of-utterance token excluded
    seconds: float  # this item's share of its batch's wall time
    finish: str = "stop"  # "stop": the model ended the essay; "length": cut at max_new_tokens
    ids: list[int] = field(default_factory=list)  # the generated token ids (stop token excluded)


def finish_of(row: list[int], stops: list[int]) -> tuple[int, str]:
    """(tokens before the first stop token, "stop"), or (all of them, "length") when the model never
    stopped (generation ran to ``max_new_tokens``)."""
    cut = next((n for n, t in enumerate(row) if t in stops), None)
    return (cut, "stop") if cut is not None else (len(row), "length")


def stop_ids(processor) -> list[int]:
    tok = processor.tokenizer
    ids = {tok.convert_tokens_to_ids("<end_of_utterance>"), tok.eos_token_id}
    return sorted(i for i in ids if i is not None and i != tok.unk_token_id)


def marker_token_ids(tokenizer, paragraphs: int = 9) -> list[int]:
    """The token ids of the seed's step markers, paragraph labels (1..``paragraphs``) and the quotes and line
    breaks around them, as the canonical layout tokenizes (:func:`pipeline.essays.canonical`)."""
    from pipeline.essays import StructuredEssay, canonical

    layout = canonical(StructuredEssay("x", ["x"] * paragraphs, "x"))
    ids = set(tokenizer(layout, add_special_tokens=False)["input_ids"])
    ids |= {i for line in layout.splitlines() if line.strip()
            for i in tokenizer(line, add_special_tokens=False)["input_ids"]}
    return sorted(ids - set(tokenizer("x", add_special_tokens=False)["input_ids"]))


class SparingRepetitionPenalty:
    """transformers' repetition penalty over the generated tokens, except for ``spared`` token ids, whose
    scores are left as the model gave them (the step markers a structured essay must repeat)."""

    def __init__(self, penalty: float, prompt_length: int, spared: list[int]):
        import torch
        from transformers import RepetitionPenaltyLogitsProcessor

        self.inner = RepetitionPenaltyLogitsProcessor(penalty, prompt_length)
        self.spared = torch.tensor(spared, dtype=torch.long)

    def __call__(self, input_ids, scores):
        spared = self.spared.to(scores.device)
        kept = scores[:, spared].clone()
        scores = self.inner(input_ids, scores)
        scores[:, spared] = kept
        return scores


def _prompt(ids: list[int]):
    from types import SimpleNamespace

    return SimpleNamespace(input_ids=ids, labels=ids)


# Rows that ended their essay leave the batch every this many new tokens (the rest go on from the same KV
# cache): a batch otherwise steps every row until its longest essay ends — in the demo 3 of the untuned
# baseline's 15 essays loop to the limit while 12 end within ~120 tokens.
SHRINK_EVERY = 32


def _generate_batch(model, cache: ChartCache, keys: list[str], *, pad_id: int, stops: list[int],
                    max_new_tokens: int, do_sample: bool, min_new_tokens: int = 0,
                    repetition_penalty: float = 1.0, spared: list[int] | None = None) -> list[list[int]]:
    """New token ids per chart (stop tokens and what follows them included): left-padded ``model.generate``
    calls fed the cached vision features, ``SHRINK_EVERY`` new tokens at a time, each continuing the unfinished
    rows from the last call's KV cache (the same tokens as one call: tests/test_models.py)."""
    import torch
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    device = next(model.parameters()).device
    batch = collate([_prompt(cache.prompt_ids(k)) for k in keys], pad_id, side="left", pixels=False)
    greedy = {} if do_sample else {"num_beams": 1, "temperature": None, "top_p": None, "top_k": None}
    # the penalty counts the essay's own tokens, not the prompt's: the title and its figures stay quotable
    # and the step markers' digits are not penalised because a year in the title contains them
    # (``spared``: token ids the penalty leaves alone, e.g. the step markers)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    length = ids.shape[1]
    processors = [] if repetition_penalty == 1.0 else \
        [SparingRepetitionPenalty(float(repetition_penalty), length, spared) if spared else
         RepetitionPenaltyLogitsProcessor(float(repetition_penalty), length)]
    rows: list[list[int]] = [[] for _ in keys]
    live, past, done = list(range(len(keys))), None, 0
    first = {"mm_encoder_outputs": cache.batch_features(keys, model)}
    while live and done < max_new_tokens:
        out = model.generate(input_ids=ids, attention_mask=mask, cache=past, **(first if past is None else {}),
                             max_new_tokens=min(SHRINK_EVERY, max_new_tokens - done),
                             min_new_tokens=max(0, min_new_tokens - done), logits_processor=LogitsProcessorList(processors),
                             do_sample=do_sample, eos_token_id=stops, pad_token_id=pad_id, return_dict_in_generate=True,
                             **greedy)
        ids, past, done = out.sequences, out.cache, out.sequences.shape[1] - length
        new = ids[:, length:].tolist()
        going = [j for j, row in enumerate(new) if not any(t in stops for t in row)]
        for j, row in enumerate(new):
            rows[live[j]] = row
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], ids.shape[1] - mask.shape[1])], dim=1)
        if going and len(going) < len(live):  # the finished rows leave; the others go on from their cache
            keep = torch.tensor(going, device=device)
            past.batch_select_indices(keep)
            ids, mask = ids[keep], mask[keep]
        live = [live[j] for j in going]
    return rows


def generate_essays(model, processor, charts: Sequence[tuple[Any, str]], *, max_new_tokens: int,
                    batch_size: int, do_sample: bool = False, min_new_tokens: int = 0,
                    repetition_penalty: float = 1.0, penalty_spares_markers: bool = False,
                    sort_by_length: bool = True,
                    cache: ChartCache | None = None, keys: Sequence[str] | None = None,
                    on_batch: Callable[[list[int], list[GenerationResult]], None] | None = None
                    ) -> list[GenerationResult]:
    """One essay per ``(PIL image, title)``, greedy unless ``do_sample``. ``cache`` (with a ``keys`` entry per
    chart) shares the encoded prompts and vision features between calls, e.g. the baseline and the adapters
    of one base model; without it they live for this call. ``on_batch(indices, results)`` runs after each
    batch (indices into ``charts``), so a caller can store results as they come. ``min_new_tokens``: no stop
    token before that many tokens, ``repetition_penalty`` (transformers') above 1.0, sparing the step markers'
    tokens with ``penalty_spares_markers`` (all the same for every model)."""
    import torch

    if cache is None:
        cache, keys = ChartCache("call"), [str(i) for i in range(len(charts))]
    elif keys is None or len(keys) != len(charts):
        raise ValueError("generate_essays: a shared cache needs one key per chart")
    tok = processor.tokenizer
    pad_id = pad_token_id(processor)
    stops = stop_ids(processor)
    spared = marker_token_ids(tok) if penalty_spares_markers and repetition_penalty != 1.0 else None
    cache.fill(model, processor, dict(zip(keys, charts)), batch_size=batch_size)
    order = list(range(len(charts)))
    if sort_by_length:
        order.sort(key=lambda i: len(cache.prompt_ids(keys[i])))
    results: list[GenerationResult | None] = [None] * len(charts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        started = time.perf_counter()
        with torch.inference_mode():
            rows = _generate_batch(model, cache, [keys[i] for i in idx], pad_id=pad_id, stops=stops,
                                   max_new_tokens=max_new_tokens, do_sample=do_sample, min_new_tokens=min_new_tokens,
                                   repetition_penalty=repetition_penalty, spared=spared)
        seconds = (time.perf_counter() - started) / len(idx)
        done = []
        for i, row in zip(idx, rows):
            cut, finish = finish_of(row, stops)
            results[i] = GenerationResult(tok.decode(row[:cut], skip_special_tokens=True).strip(), cut, seconds,
                                          finish, row[:cut])
            done.append(results[i])
        if on_batch is not None:
            on_batch(idx, done)
    return results  # type: ignore[return-value]
