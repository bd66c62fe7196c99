"""MiniMax's OpenAI-compatible chat API as its documentation describes it (sources in docs/teacher.md,
"MiniMax as documented"): what ``config --check`` refuses and what the client keeps within.

- ``temperature`` must lie in (0, 1]; 0 is an error.
- The completion (thinking included) is capped at 2048 tokens (``max_tokens`` / ``max_completion_tokens``).
- MiniMax-M3 understands images; the M2.x models (M2, M2.1, M2.5, M2.7 and their -highspeed variants) and the
  older MiniMax-M1 and MiniMax-Text-01 take text only.
- The M-series put their reasoning inside ``content`` as ``<think>…</think>`` (unless ``reasoning_split``).
"""

from __future__ import annotations

import re

MAX_COMPLETION_TOKENS = 2048
TEMPERATURE_RANGE = (0.0, 1.0)  # (exclusive, inclusive]
_MINIMAX = re.compile(r"minimax", re.IGNORECASE)
_VISION = re.compile(r"^(?:minimax/)?(?:minimax-m3|minimax-vl)", re.IGNORECASE)


def is_minimax(model: str | None) -> bool:
    """Whether ``model`` names a MiniMax model (the rules apply whatever the base_url: a proxy, a rehearsal)."""
    return bool(model and _MINIMAX.search(model))


def accepts_images(model: str | None) -> bool:
    return bool(model and _VISION.search(model))


def output_cap(model: str | None) -> int | None:
    """The most completion tokens one request may ask for, or None where no cap is known."""
    return MAX_COMPLETION_TOKENS if is_minimax(model) else None


def violations(model: str | None, *, temperature: float | None, limit: int | None, images: bool) -> list[str]:
    """What a MiniMax endpoint rejects in a request of ``model`` (empty: nothing, or not a MiniMax model)."""
    if not is_minimax(model):
        return []
    out = []
    low, high = TEMPERATURE_RANGE
    if temperature is not None and not low < temperature <= high:
        out.append(f"temperature {temperature:g} outside ({low:g}, {high:g}]")
    if limit is not None and limit > MAX_COMPLETION_TOKENS:
        out.append(f"{limit} completion tokens requested; the cap is {MAX_COMPLETION_TOKENS}")
    if images and not accepts_images(model):
        out.append(f"{model} takes text only; images are understood by MiniMax-M3")
    return out
