"""Essay quality checks: one set of detectors for the teacher's gates and the report's failure modes.

``failure_modes`` names what is wrong with a text from a fixed vocabulary (``MODES``); ``gate`` turns the
same findings into human-readable reasons under a TeacherSection's thresholds, so the gate and the report
never disagree. The essay's structure and word counts come from ``pipeline.essays``.

Numbers: ``numeric_faithfulness`` is the share of the essay's figures found in the chart's data table,
tolerant of formatting (``4,751,653``, ``29.8%``, ``$12``), rounding (``about 30`` for 29.6, ``4.75 million``
for 4,751,653), percent/fraction scales, and differences between two table values (``rose by 5 points``).
Bare integers up to 12 (``three paragraphs``, ``10 years``) are not treated as data.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pipeline.essays import EssayFormatError, essay_paragraphs, parse_structured, word_count

if TYPE_CHECKING:
    from pipeline.config import TeacherSection

MODES = ("question_list", "markdown", "bullets", "too_short", "too_long", "missing_paragraphs",
         "structure_markers", "invented_numbers")

_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\d)"
                     r"(?:\s*(%|per ?cent|thousand|million|billion|trillion|bn|m\b|k\b))?", re.I)
_SCALE = {"thousand": 1e3, "k": 1e3, "million": 1e6, "m": 1e6, "billion": 1e9, "bn": 1e9, "trillion": 1e12}
_MARKER = re.compile(r"^\s*(?:#+\s*)?[*_]*\s*(?:[1-3]\s*[.):]\s*)?[*_]*\s*(?:<[^<>\n]{1,80}>|"
                     r"(?:body\s+)?paragraph\s*\d+|(?:describe a graph|find the key points[^:\n]*|"
                     r"write a summary[^:\n]*|graph description|overview))\s*[*_]*\s*:?\s*[*_]*\s*:?\s*[*_]*\s*$", re.I)
_BULLET = re.compile(r"^\s*(?:[-*+\u2022\u25cf\u25aa\u2013]|\d{1,2}[.)])\s+\S")
_MARKDOWN = (re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__"), re.compile(r"^\s*#{1,6}\s+\S", re.M),
             re.compile(r"`[^`\n]+`"), re.compile(r"^\s*\|.*\|\s*$", re.M), re.compile(r"\[[^\]\n]+\]\([^)\s]+\)"))
_SENTENCE = re.compile(r"(?<=[.!?])[\"\u201d]?\s+(?=[\"\u201c]?[A-Z0-9])")
_MAX_PAIRS = 400  # table values beyond this: no difference matching (keeps the check O(n log n))


# --------------------------------------------------------------------------- numbers


def _numbers(text: str) -> list[tuple[str, float, float, int]]:
    """(as written, value, scale word's factor, decimals written) for each figure in ``text``."""
    out = []
    for m in _NUMBER.finditer(text):
        value = float(m.group(1).replace(",", "") + (m.group(2) or ""))
        unit = (m.group(3) or "").lower().replace(" ", "")
        out.append((m.group(0).strip(), value, _SCALE.get(unit, 1.0), len(m.group(2) or ".") - 1))
    return out


def _is_data(written: str, value: float) -> bool:
    """Small bare integers are counts or ordinals in prose, not data."""
    return not (value <= 12 and value == int(value) and re.fullmatch(r"\d+", written))


def _prose(text: str) -> str:
    return "\n\n".join(essay_paragraphs(text))


def _figures(text: str) -> list[tuple[str, float, float, int]]:
    """``_numbers`` of the essay's prose (structure markers excluded) that are data, not counts."""
    return [f for f in _numbers(_prose(text)) if _is_data(f[0], f[1])]


def numbers_in(text: str) -> list[float]:
    """The figures of the essay's prose as numbers (structure markers excluded; scale words not applied)."""
    return [value for _, value, _, _ in _figures(text)]


def _cell_value(cell: Any) -> float | None:
    """The number of a cell that holds exactly one figure, else None."""
    found = _numbers(str(cell))
    return found[0][1] if len(found) == 1 else None


def numbers_in_table(rows: Iterable[Iterable[Any]] | None) -> list[float]:
    """Every number in every cell (header cells included: years often sit there), sorted and unique."""
    found = {value for row in rows or [] for cell in row for _, value, _, _ in _numbers(str(cell))}
    return sorted(found)


class _Table:
    """Sorted table values, and differences within a column or a row (labels and header excluded)."""

    def __init__(self, rows: Iterable[Iterable[Any]]):
        rows = [list(r) for r in rows]
        self.values = numbers_in_table(rows)
        cells = [[_cell_value(c) for c in row] for row in rows[1:]]
        lines = [[v for v in row[1:] if v is not None] for row in cells]  # a row's values, its label excluded
        lines += [[v for v in col if v is not None] for col in zip(*cells)] if cells else []
        self.diffs = sorted({round(abs(a - b), 6) for line in lines if len(line) <= _MAX_PAIRS
                             for i, a in enumerate(line) for b in line[i + 1:]})

    @staticmethod
    def _near(sorted_vals: list[float], x: float, tol: float) -> bool:
        i = bisect.bisect_left(sorted_vals, x - tol)
        return i < len(sorted_vals) and sorted_vals[i] <= x + tol

    def has(self, value: float, scale: float, decimals: int) -> bool:
        """Is the figure a table value or a difference of two, read as written, scaled, or as %/fraction?"""
        rounding = 0.5 * 10 ** -decimals  # "about 30" stands for 29.5..30.5; "4.75" for 4.745..4.755
        for factor in {1.0, scale, 100.0, 0.01}:
            x, tol = value * factor, rounding * factor
            tol = max(tol, 0.01 * abs(x))  # "4,700,000" for 4,751,653: rounding beyond the digits shown
            if self._near(self.values, x, tol) or self._near(self.diffs, x, tol):
                return True
        return False


def invented_numbers(text: str, table_rows: Iterable[Iterable[Any]] | None) -> list[str] | None:
    """The essay's figures (as written) that match nothing in the table; None without a table."""
    rows = list(table_rows or [])
    if not rows:
        return None
    return _not_in_table(_figures(text), rows)


def _not_in_table(figures: list[tuple[str, float, float, int]], rows: list[Any]) -> list[str]:
    table = _Table(rows)
    return [w for w, v, s, d in figures if not table.has(v, s, d)]


def numeric_faithfulness(essay: str, table_rows: Iterable[Iterable[Any]] | None) -> float | None:
    """Share of the essay's figures found in the table (1.0 when it quotes none); None without a table."""
    rows = list(table_rows or [])
    if not rows:
        return None
    figures = _figures(essay)
    if not figures:
        return 1.0
    return 1.0 - len(_not_in_table(figures, rows)) / len(figures)


# --------------------------------------------------------------------------- detectors


def _content_lines(text: str) -> list[str]:
    """Lines of the text other than structure markers (``1. <Describe a graph>:``, ``Paragraph 1:``)."""
    return [line for line in text.replace("\r\n", "\n").split("\n") if line.strip() and not _MARKER.match(line)]


def _findings(text: str, *, variant: str | None, min_words: int, max_words: int,
              table_rows: Iterable[Iterable[Any]] | None) -> list[tuple[str, str]]:
    """[(mode, human-readable reason)] for one text; shared by failure_modes and gate."""
    found: list[tuple[str, str]] = []
    lines = _content_lines(text)
    body = "\n".join(lines)
    sentences = [s for s in _SENTENCE.split(" ".join(lines)) if len(s.split()) >= 3] or [body]
    questions = sum(1 for s in sentences if s.rstrip('"\u201d ').endswith("?"))
    if questions and (questions >= 2 and questions / len(sentences) >= 0.3 or len(sentences) <= 2):
        found.append(("question_list", f"asks questions instead of describing the chart ({questions} questions)"))
    if any(rx.search(body) for rx in _MARKDOWN):
        found.append(("markdown", "uses markdown formatting (bold, headings, code or tables)"))
    bullets = sum(1 for line in lines if _BULLET.match(line))
    if bullets >= 2:
        found.append(("bullets", f"uses a list ({bullets} bulleted or numbered lines) instead of prose paragraphs"))
    words = word_count(text)
    if words < min_words:
        found.append(("too_short", f"too short: {words} words (min {min_words})"))
    if words > max_words:
        found.append(("too_long", f"too long: {words} words (max {max_words})"))
    try:
        parsed = parse_structured(text)
    except EssayFormatError as exc:
        parsed, why = None, str(exc)
    if variant == "structured" and parsed is None:
        found.append(("missing_paragraphs", f"three-step structure not found: {why}"))
    elif variant == "unstructured":
        if parsed is not None or len(lines) != len([ln for ln in text.split("\n") if ln.strip()]):
            found.append(("structure_markers", "contains structure markers (expected plain prose)"))
        elif len(paragraphs := essay_paragraphs(text)) < 3:
            found.append(("missing_paragraphs", f"{len(paragraphs)} paragraph(s); expected a "
                                                "description, body paragraphs and an overview"))
    invented = invented_numbers(text, table_rows)
    if invented:
        shown = ", ".join(invented[:5]) + (f" (+{len(invented) - 5} more)" if len(invented) > 5 else "")
        found.append(("invented_numbers", f"numbers not in the data table: {shown}"))
    return found


def failure_modes(text: str, *, variant: str | None = None, min_words: int = 120, max_words: int = 190,
                  table_rows: Iterable[Iterable[Any]] | None = None) -> list[str]:
    """What is wrong with ``text``, as names from ``MODES`` (empty: nothing detected).

    ``variant="structured"``: the three-step structure must parse (else ``missing_paragraphs``);
    ``"unstructured"``: markers are a failure (``structure_markers``) and fewer than three prose paragraphs
    is ``missing_paragraphs``; ``None``: no structure expectation. ``invented_numbers`` needs ``table_rows``.
    """
    return [mode for mode, _ in _findings(text, variant=variant, min_words=min_words, max_words=max_words,
                                          table_rows=table_rows)]


def gate_findings(essay: str, table_rows: Iterable[Iterable[Any]] | None,
                  cfg: "TeacherSection") -> list[tuple[str, str]]:
    """[(mode, reason)] for the teacher's gate (mode ``empty`` for an empty answer)."""
    if not essay or not essay.strip():
        return [("empty", "empty answer")]
    return _findings(essay, variant="structured" if cfg.require_structure else None, min_words=cfg.min_words,
                     max_words=cfg.max_words, table_rows=table_rows if cfg.check_numbers else None)


def gate(essay: str, table_rows: Iterable[Iterable[Any]] | None, cfg: "TeacherSection") -> list[str]:
    """Human-readable reasons the teacher's essay fails (empty: it passes). Thresholds from ``cfg``:
    ``min_words``/``max_words``, ``require_structure`` (structured variant), ``check_numbers``."""
    return [why for _, why in gate_findings(essay, table_rows, cfg)]
