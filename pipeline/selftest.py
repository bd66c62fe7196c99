"""The judge's self-test: planted pairs whose better essay is known and is *not* the reference.

The good essay is the chart's human-written Chart-to-Text summary (``summary`` in ingest's charts.jsonl),
shown in the pair's layout (:func:`pipeline.essays.in_form`); the bad one is a copy of that same text made
worse in one known way (:data:`PLANTED`). The judge sees the teacher's essay as the reference, as for every
pair, so neither text is a copy of it: a judge that only matches strings against the reference, prefers the
longer text or the first position fails (tests/test_selftest.py).
"""

from __future__ import annotations

import random
import re

from pipeline.essays import essay_paragraphs, structured_form

PLANTED = ("figures", "truncated", "bullets", "markers")
_SENTENCE = re.compile(r"(?<=[.!?])[\"\u201d]?\s+(?=[\"\u201c]?[A-Z0-9])")


def good_essay(summary: str, form: str) -> str:
    """The human summary as the planted pairs' good essay: its lines as paragraphs, in ``form``."""
    from pipeline.essays import in_form

    return in_form(re.sub(r"\s*\n\s*", "\n\n", summary.strip()), form)


def perturb_figures(text: str, rng: random.Random) -> str:
    """Every data figure but years moved by 7-30 % up or down, written with the same decimals (one unit of the
    last digit more where the move would round back to the figure written)."""
    from pipeline.quality import _NUMBER, _is_data

    def moved(m: re.Match) -> str:
        value = float(m.group(1).replace(",", "") + (m.group(2) or ""))
        year = not (m.group(2) or m.group(3)) and 1900 <= value <= 2100
        if year or not _is_data(m.group(0).strip(), value):
            return m.group(0)
        decimals = len(m.group(2) or ".") - 1
        new = value * (1 + rng.choice((1, -1)) * rng.uniform(0.07, 0.30))
        if round(new, decimals) == round(value, decimals):
            new = value + 10 ** -decimals
        digits = f"{new:,.{decimals}f}" if "," in m.group(1) else f"{new:.{decimals}f}"
        return digits + m.string[m.end(2) if m.group(2) else m.end(1):m.end()]

    return _NUMBER.sub(moved, text)


def planted(good: str, kind: str, rng: random.Random) -> str:
    """A copy of ``good`` that is worse in one known way: ``figures`` changed by 7-30 %, ``truncated`` (cut
    after half its words, mid-sentence, its layout kept), ``bullets`` (each sentence a ``- `` line) or
    ``markers`` (the seed's step markers and paragraph labels added: the same text in the structured layout).
    Returns ``good`` unchanged where the corruption does not apply (no figure to move, markers already there)."""
    if kind == "figures":
        return perturb_figures(good, rng)
    if kind == "truncated":
        words = list(re.finditer(r"\S+", good))
        return good[: words[len(words) // 2 - 1].end()].rstrip(".,;:!?") if len(words) >= 4 else good
    if kind == "bullets":
        sentences = [s.strip() for p in essay_paragraphs(good) for s in _SENTENCE.split(p) if s.strip()]
        return "\n".join(f"- {s}" for s in sentences)
    if kind == "markers":
        return structured_form(good)
    raise ValueError(f"unknown planted corruption {kind!r} (expected one of {', '.join(PLANTED)})")
