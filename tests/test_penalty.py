"""generate.penalty_spares_markers: the repetition penalty leaves the step markers' tokens alone (issue 25,
item 7), on the tiny student's real tokenizer and model. The before/after effect on the demo's students
(marker share, mean words) needs a full demo run and is not measured here."""

from __future__ import annotations

import torch
from student_fixtures import sample_charts

from pipeline.config import GenerateSection
from pipeline.models.generation import SparingRepetitionPenalty, generate_essays, marker_token_ids


def test_the_penalty_spares_the_marker_tokens_and_nothing_else(tiny_loaded):
    _, processor = tiny_loaded
    tok = processor.tokenizer
    spared = marker_token_ids(tok)
    for text in ("1. <Describe a graph>:", "Paragraph 2:", "3. <Write a summary of presented data>:"):
        assert set(tok(text, add_special_tokens=False)["input_ids"]) <= set(spared), text
    word = next(i for i in tok(" households debt", add_special_tokens=False)["input_ids"] if i not in spared)
    marker = tok("Paragraph", add_special_tokens=False)["input_ids"][0]
    prompt = [5, 6]
    ids = torch.tensor([prompt + [marker, word]])
    scores = torch.full((1, len(tok)), 2.0)
    out = SparingRepetitionPenalty(2.0, len(prompt), spared)(ids, scores.clone())
    assert out[0, marker] == 2.0  # used in the essay, spared
    assert out[0, word] == 1.0  # used in the essay, penalised (2.0 / 2)
    assert out[0, 7] == 2.0  # never used
    assert GenerateSection().decoding()["penalty_spares_markers"] is True  # on for every model by default


def test_generation_with_spared_markers_decodes_as_the_processor_says(tiny_loaded, sample_dir):
    model, processor = tiny_loaded
    charts = sample_charts(sample_dir, 2)
    plain = generate_essays(model, processor, charts, max_new_tokens=24, batch_size=1, repetition_penalty=5.0)
    spared = generate_essays(model, processor, charts, max_new_tokens=24, batch_size=1, repetition_penalty=5.0,
                             penalty_spares_markers=True)
    assert len(spared) == len(plain) and all(r.tokens for r in spared)
    marker_ids = set(marker_token_ids(processor.tokenizer))
    # the runs part where a marker token is (or has been) in play: the spared run picks it again
    diverged = [(a.ids, b.ids, next(n for n, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y))
                for a, b in zip(plain, spared) if a.ids != b.ids]
    assert diverged, "sparing the markers changed nothing: the test cannot tell the two apart"
    for a, b, n in diverged:
        assert b[n] in marker_ids and b[n] in b[:n]  # a repeated marker token the plain penalty pushed down
