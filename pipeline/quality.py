"""Essay quality checks: one set of detectors for the teacher's gates and the report's failure modes.

``failure_modes`` names what is wrong with a text from a fixed vocabulary (``MODES``); ``gate`` turns the
same findings into human-readable reasons under a TeacherSection's thresholds, so the gate and the report
never disagree. The essay's structure and word counts come from ``pipeline.essays``.

Numbers: ``numeric_faithfulness`` is the share of the essay's figures found in their cell of the chart's
data table (the row their sentence names, or the previous sentence's subject), tolerant of formatting
(``4,751,653``, ``29.8%``, ``$12``), rounding (``about 30`` for 29.6, ``4.75 million`` for 4,751,653), percent/fraction scales, and differences between two table values (``rose by 5 points``).
Bare integers up to 12 (``three paragraphs``, ``10 years``) are not treated as data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pipeline.essays import (
    EssayFormatError,
    essay_paragraphs,
    parse_structured,
    word_count,
)

if TYPE_CHECKING:
    from pipeline.config import TeacherSection

MODES = ("question_list", "markdown", "bullets", "too_short", "too_long", "missing_paragraphs",
         "structure_markers", "invented_numbers", "truncated", "refusal", "emoji")
# The seed's failure modes of the students, shown per model in the report whether or not they occur.
SEED_MODES = ("question_list", "markdown", "bullets", "too_short", "truncated")

_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\d)"
                     r"(?:\s*(%|per ?cent|thousand|million|billion|trillion|bn|m\b|k\b))?", re.IGNORECASE)
_SCALE = {"thousand": 1e3, "k": 1e3, "million": 1e6, "m": 1e6, "billion": 1e9, "bn": 1e9, "trillion": 1e12}
_MARKER = re.compile(r"^\s*(?:#+\s*)?[*_]*\s*(?:[1-3]\s*[.):]\s*)?[*_]*\s*(?:<[^<>\n]{1,80}>|"
                     r"(?:body\s+)?paragraph\s*\d+|(?:describe a graph|find the key points[^:\n]*|"
                     r"write a summary[^:\n]*|graph description|overview))\s*[*_]*\s*:?\s*[*_]*\s*:?\s*[*_]*\s*$", re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*+\u2022\u25cf\u25aa\u2013]|\d{1,2}[.)])\s+\S")
_MARKDOWN = (re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__"), re.compile(r"^\s*#{1,6}\s+\S", re.MULTILINE),
             re.compile(r"`[^`\n]+`"), re.compile(r"^\s*\|.*\|\s*$", re.MULTILINE), re.compile(r"\[[^\]\n]+\]\([^)\s]+\)"))
_MARKDOWN_CHARS = re.compile(r"[*_#`|\[]")  # each of _MARKDOWN needs one of these: prose without them is clean
_SENTENCE = re.compile(r"(?<=[.!?])[\"\u201d]?\s+(?=[\"\u201c]?[A-Z0-9])")
# A refusal, an apology or a request for more input: what a cautious model writes instead of an essay
# (none of the sample's 120 human summaries or the prompts' example essays matches).
_REFUSAL = re.compile(
    r"\bI(?:'m|\s+am)\s+(?:sorry|afraid|unable|not\s+able)\b|"
    r"\bI\s+(?:can(?:no|['\u2019])t|cannot|won['\u2019]t|do\s+not|don['\u2019]t)\s+(?:assist|help|provide|see|view|access|"
    r"describe|analy[sz]e|generate|write|fulfil|complete|open|interpret|comply|create|have\s+(?:access|the))\b|"
    r"\bas\s+an\s+(?:ai|a\.i\.|language\s+model)\b|"
    r"\b(?:could|can|would)\s+you\s+(?:please\s+)?(?:provide|share|upload|send|give|attach|clarify|specify)\b|"
    r"\bplease\s+(?:provide|share|upload|send|attach|clarify|specify)\b|"
    r"\bif\s+you\s+(?:can\s+|could\s+)?(?:provide|share|upload|send)\b|"
    r"\b(?:I|we)\s+(?:would\s+)?need\s+(?:more|additional|access|to\s+see)\b|"
    r"\b(?:let\s+me\s+know|feel\s+free\s+to|I\s+hope\s+this\s+helps)\b|\bunfortunately,?\s+I\b", re.IGNORECASE)
# Emoji and pictographs (with their joiners and variation selector), and hashtags: a social-media post, not
# an essay ("#1", "C#" and markdown headings are not hashtags).
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\u2300-\u23FF\uFE0F\u200D]")
_HASHTAG = re.compile(r"(?<![\w&/#])#[A-Za-z][A-Za-z0-9_]*")
_EMOJI_OR_HASHTAG = re.compile(f"{_EMOJI.pattern}|{_HASHTAG.pattern}")


# --------------------------------------------------------------------------- numbers


def _numbers(text: str) -> list[tuple[str, float, float, int, int, int]]:
    """(as written, value, scale word's factor, decimals written, start, end) for each figure in ``text``."""
    out = []
    for m in _NUMBER.finditer(text):
        value = float(m.group(1).replace(",", "") + (m.group(2) or ""))
        unit = (m.group(3) or "").lower().replace(" ", "")
        out.append((m.group(0).strip(), value, _SCALE.get(unit, 1.0), len(m.group(2) or ".") - 1,
                    m.start(), m.end()))
    return out


def _is_data(written: str, value: float) -> bool:
    """Small bare integers are counts or ordinals in prose, not data."""
    return not (value <= 12 and value == int(value) and re.fullmatch(r"\d+", written))


def _prose(text: str) -> str:
    return "\n\n".join(essay_paragraphs(text))


def numbers_in(text: str) -> list[float]:
    """The figures of the essay's prose as numbers (structure markers excluded; scale words not applied)."""
    return [f[1] for f in _numbers(_prose(text)) if _is_data(f[0], f[1])]


_PLAIN = re.compile(r"\d+(?:\.\d+)?")  # a cell that is one figure, as _NUMBER reads it: no regex search needed


def _cell_value(cell: Any) -> tuple[float, float] | None:
    """(value, half a unit of its last digit) of a cell that holds exactly one figure, else None."""
    cell = str(cell)
    if _PLAIN.fullmatch(cell):
        point = cell.find(".")
        return float(cell), 0.5 * 10 ** -(len(cell) - point - 1 if point >= 0 else 0)
    found = _numbers(cell)
    if len(found) != 1:
        return None
    _, value, scale, decimals, _, _ = found[0]
    return value * scale, 0.5 * 10 ** -decimals * scale


def numbers_in_table(rows: Iterable[Iterable[Any]] | None) -> list[float]:
    """Every number in every cell (header cells included: years often sit there), sorted and unique."""
    return sorted({f[1] for row in rows or [] for cell in row for f in _numbers(str(cell))})


def _half_unit(written: str, value: float, decimals: int) -> float:
    """Half a unit of the last digit written: "29.8" -> 0.05, "30" -> 0.5; an integer ending in three or more
    zeros is read as rounded there ("4,700,000" -> 50,000), a shorter one as exact ("350" -> 0.5)."""
    if decimals or value == 0:
        return 0.5 * 10 ** -decimals
    digits = re.sub(r"\D", "", written.split(".")[0])
    zeros = len(digits) - len(digits.rstrip("0"))
    return 0.5 * 10 ** zeros if zeros >= 3 and zeros < len(digits) else 0.5


_UNIT = re.compile(r"\bin\s+(?:(?:u\.?s\.?\s+)?(?:\$|us\$)?\s*)?(thousand|million|billion|trillion|1,000|1,000,000)s?\b",
                   re.IGNORECASE)
_UNIT_FACTOR = {"thousand": 1e3, "1,000": 1e3, "million": 1e6, "1,000,000": 1e6, "billion": 1e9, "trillion": 1e12}
_STOP = {"and", "the", "of", "in", "for", "to", "by", "on", "at", "a", "an", "other", "others", "total", "share",
         "number", "value", "values", "percentage", "per", "cent", "vs"}
_CUE = re.compile(r"\b(by|differences?|gap|points?|times|growth|increases?d?|decreases?d?|changes?d?|more|less|"
                  r"higher|lower|fewer|rise|rose|drop|dropped|fall|fell|jump|jumped|up|down|grew|twice|double)\b", re.IGNORECASE)
_MAX_PAIRS = 60  # cells per line beyond this: no derived quantities (keeps the check small)


_TOKEN = re.compile(r"[a-z][a-z'-]+|\d+(?:[.,]\d+)*")
_ASIDE = re.compile(r"\([^)]*\)|[*\u2020]")  # parentheses and footnote marks of a label
_NOT_LABEL = re.compile(r"[^\w%.,' -]")
_SPACE_OR_COMMA = re.compile(r"[\s,]")


def _label_keys(label: str) -> tuple[str, set[str]]:
    """A label's normalised text (parentheses, footnote marks dropped) and its content words and numbers."""
    text = " ".join(_NOT_LABEL.sub(" ", _ASIDE.sub(" ", label.lower())).split()).strip(" .,")
    words = {w for w in _TOKEN.findall(text) if w not in _STOP and (len(w) >= 3 or w[0].isdigit())}
    return text, words


def _mentions(sentence: str, words_in: set[str], label: tuple[str, set[str]]) -> bool:
    text, words = label
    if not text:
        return False
    if len(text) >= 3 and _whole_word_in(text, sentence):
        return True
    return bool(words) and words <= words_in


def _whole_word_in(text: str, sentence: str) -> bool:
    r"""``re.search(rf"(?<!\w){re.escape(text)}(?!\w)", sentence)`` without a regex per label (the labels of many
    charts overflow re's cache: compiling them was ~40 % of the gate's time)."""
    start = sentence.find(text)
    while start != -1:
        end = start + len(text)
        if (start == 0 or not _word_char(sentence[start - 1])) and (end == len(sentence) or not _word_char(sentence[end])):
            return True
        start = sentence.find(text, start + 1)
    return False


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"  # what \w matches in a str pattern


def _written_key(written: str) -> str:
    return _SPACE_OR_COMMA.sub("", written.lower())


@dataclass
class Figure:
    """One figure of an essay and what it was matched to."""

    written: str
    # "value" (its cell), "derived" (difference, change or ratio of two cells), "reference" (a label or the
    # title), "unverifiable" (its sentence ties it to no row or column, though some cell has it), "unmatched"
    kind: str
    cell: tuple[int, int] | None = None  # (row, column) of the table, header row = 0

    @property
    def correct(self) -> bool:
        return self.kind in ("value", "derived")


class DataTable:
    """A chart's data table: numeric cells with their rounding, row labels, column headers and the title's unit.

    ``align(essay)`` ties each figure of the essay to the rows and columns its sentence names — or, when it
    names no row, the subject carried over from the previous sentence of the paragraph — and matches it to a
    cell there, within the rounding of both the figure and the cell, in the title's unit ("1.6 billion" for
    1,608 in a table "in million"); near a change word ("by", "points", "increase", "times") also to
    differences, percentage changes and ratios of two of those cells (within one row, or one column among
    the named rows). A figure that cannot be tied to any row or column is ``unverifiable`` (not correct),
    or ``unmatched`` when no cell of the table has it at all. Numbers written as in the title, the header row
    or the label column (years, age groups), and bare years (1900-2100), are references, not data, and count
    neither way.
    """

    def __init__(self, rows: Iterable[Iterable[Any]], title: str | None = None):
        rows = [[str(c) for c in r] for r in rows]
        self.rows = rows
        header = rows[0] if rows else []
        unit = _UNIT.search(" ".join([title or "", *header]))
        self.unit = _UNIT_FACTOR[unit.group(1).lower()] if unit else 1.0
        self.cells: dict[tuple[int, int], tuple[float, float]] = {}
        for i, row in enumerate(rows[1:], 1):
            for j, cell in enumerate(row[1:], 1):
                parsed = _cell_value(cell)
                if parsed is not None:
                    self.cells[(i, j)] = parsed
        self.references = {_written_key(f[0]) for text in [title or "", *header, *(r[0] for r in rows[1:] if r)]
                           for f in _numbers(text)}
        self.row_labels = {i: _label_keys(r[0]) for i, r in enumerate(rows[1:], 1) if r}
        self.col_labels = {j: _label_keys(h) for j, h in enumerate(header) if j}

    # ---------------------------------------------------------------- alignment

    def named(self, sentence: str) -> tuple[set[int], set[int]]:
        """The rows and columns whose labels the sentence names."""
        low = sentence.lower()
        words = set(_TOKEN.findall(low))
        return ({i for i, lab in self.row_labels.items() if _mentions(low, words, lab)},
                {j for j, lab in self.col_labels.items() if _mentions(low, words, lab)})

    def candidates(self, rows: set[int], cols: set[int]) -> list[list[tuple[int, int]]]:
        """The cells a sentence about ``rows`` and ``cols`` can quote, most specific first: the rows' cells in
        the columns, then the rows' other cells (a series named, its year left implicit); with no row, the
        columns' cells only when the table has one data row (else a column names many cells, none in
        particular); otherwise none (the figure is tied to nothing)."""
        if rows:
            return [[c for c in self.cells if c[0] in rows and c[1] in cols],
                    [c for c in self.cells if c[0] in rows and c[1] not in cols]]
        return [[c for c in self.cells if c[1] in cols]] if cols and len(self.row_labels) == 1 else []

    def _near(self, x: float, tol: float, cell: tuple[float, float]) -> bool:
        value, half = cell
        return any(abs(abs(x) - abs(v)) < tol + h for v, h in ((value, half), (value * self.unit, half * self.unit)))

    def match(self, written: str, value: float, scale: float, decimals: int, rows: set[int], cols: set[int],
              window: str) -> Figure:
        if _written_key(written) in self.references or (re.fullmatch(r"\d{4}", written) and 1900 <= value <= 2100):
            return Figure(written, "reference")  # a label of the table or the title, or a bare year
        half = _half_unit(written, value, decimals)
        percent = "%" in written or "cent" in written.lower()
        forms = [(value * scale, half * scale)] + ([(value, half)] if scale != 1.0 else [])
        groups = self.candidates(rows, cols)
        for cid in (c for group in groups or [list(self.cells)] for c in group):
            if any(self._near(x, tol, self.cells[cid]) for x, tol in forms):
                return Figure(written, "value", cid) if groups else Figure(written, "unverifiable")
        if rows and _CUE.search(window):  # the named rows' cells in the named columns, else all of the rows'
            cells = groups[0] if len(groups[0]) > 1 else groups[0] + groups[1]
            if self._derived(value * scale, half * scale, percent, cells):
                return Figure(written, "derived")
        return Figure(written, "unmatched")

    def _derived(self, x: float, tol: float, percent: bool, cells: list[tuple[int, int]]) -> bool:
        """Is x the difference, percentage change or ratio of two candidate cells in one row or column?"""
        lines: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for i, j in cells:
            lines.setdefault(("row", i), []).append(self.cells[(i, j)])
            lines.setdefault(("col", j), []).append(self.cells[(i, j)])
        for line in lines.values():
            if len(line) > _MAX_PAIRS:
                continue
            for a, ha in line:
                for b, hb in line:
                    if a == b and ha == hb:
                        continue
                    for scale in (1.0, self.unit):
                        d, hd = abs(a - b) * scale, (ha + hb) * scale
                        if abs(x - d) < tol + hd:
                            return True
                    if a and b:
                        ratio, rel = b / a, ha / abs(a) + hb / abs(b)
                        if percent and abs(abs(x) - abs(ratio - 1) * 100) < tol + 100 * abs(ratio) * rel:
                            return True
                        if not percent and ratio > 1 and abs(x - ratio) < tol + ratio * rel:
                            return True
        return False

    def align(self, essay: str) -> list[Figure]:
        out = []
        for paragraph in essay_paragraphs(essay):
            sentences = [(s, [f for f in _numbers(s) if _is_data(f[0], f[1])]) for s in _SENTENCE.split(paragraph)]
            if not any(figures for _, figures in sentences):
                continue  # nothing to tie: the rows a sentence names matter only to its figures
            subject: tuple[set[int], set[int]] = (set(), set())  # carried from sentence to sentence
            for sentence, figures in sentences:
                rows, cols = self.named(sentence)
                if not rows:  # the subject of the previous sentence, with this sentence's columns if it names any
                    rows, cols = subject[0], cols or (subject[1] if subject[0] else set())
                subject = (rows, cols)
                for written, value, scale, decimals, start, end in figures:
                    window = sentence[max(0, start - 30):end + 20]
                    out.append(self.match(written, value, scale, decimals, rows, cols, window))
        return out

    def key_cells(self) -> set[tuple[int, int]]:
        """What an overview should mention: each column's first, last, largest and smallest cell."""
        keys: set[tuple[int, int]] = set()
        by_col: dict[int, list[tuple[int, int]]] = {}
        for cid in sorted(self.cells):
            by_col.setdefault(cid[1], []).append(cid)
        for col in by_col.values():
            keys |= {col[0], col[-1], max(col, key=lambda c: self.cells[c][0]),
                     min(col, key=lambda c: self.cells[c][0])}
        return keys


def numeric_scores(essay: str, table_rows: Iterable[Iterable[Any]] | None, title: str | None = None
                   ) -> dict[str, Any] | None:
    """Numeric faithfulness of one essay against its chart's table; None without a table.

    ``precision``: share of the essay's data figures tied to their cell (or a difference, change or ratio of
    two tied cells), None when it quotes none — a figure its sentence ties to no row or column is
    ``unverifiable`` and not correct; ``tied_precision``: the same over the tied figures only; ``coverage``:
    share of the table's key cells (each column's first, last, largest, smallest) that some figure matches;
    ``unverifiable``: how many figures are tied to nothing; ``unmatched``: the figures (as written) that are
    wrong: not their tied cell's, or in no cell at all."""
    rows = list(table_rows or [])
    if not rows:
        return None
    table = DataTable(rows, title)
    figures = [f for f in table.align(essay) if f.kind != "reference"]
    keys = table.key_cells()
    covered = keys & {f.cell for f in figures if f.cell}
    correct = sum(f.correct for f in figures)
    unverifiable = sum(f.kind == "unverifiable" for f in figures)
    tied = len(figures) - unverifiable
    return {"figures": len(figures), "correct": correct, "unverifiable": unverifiable,
            "precision": correct / len(figures) if figures else None,
            "tied_precision": correct / tied if tied else None,
            "key_cells": len(keys), "covered": len(covered),
            "coverage": len(covered) / len(keys) if keys else None,
            "unmatched": [f.written for f in figures if f.kind == "unmatched"]}


def invented_numbers(text: str, table_rows: Iterable[Iterable[Any]] | None, title: str | None = None
                     ) -> list[str] | None:
    """The essay's figures (as written) that match nothing in the table; None without a table."""
    scores = numeric_scores(text, table_rows, title)
    return None if scores is None else scores["unmatched"]


def numeric_faithfulness(essay: str, table_rows: Iterable[Iterable[Any]] | None, title: str | None = None
                         ) -> float | None:
    """Numeric precision (see :func:`numeric_scores`); None without a table or without data figures."""
    scores = numeric_scores(essay, table_rows, title)
    return None if scores is None else scores["precision"]


# --------------------------------------------------------------------------- detectors


def refusal(text: str) -> str | None:
    """The first phrase of ``text`` that refuses, apologises or asks for more input, else None."""
    m = _REFUSAL.search(text)
    return m.group(0) if m else None


def emoji_and_hashtags(text: str, title: str | None = None, data: str | None = None,
                       table_rows: Iterable[Iterable[Any]] | None = None) -> list[str]:
    """The emoji and hashtags in ``text``, in order, but those that the chart's title, data block or table
    holds: a chart of the most used hashtags may be quoted."""
    if not (_EMOJI.search(text) or "#" in text):  # every match needs one: most texts have neither
        return []
    marks = [m.group(0) for m in _EMOJI_OR_HASHTAG.finditer(text) if m.group(0) not in ("\ufe0f", "\u200d")]
    if not marks:
        return []
    quotable = "\n".join([title or "", data or "", *("\t".join(map(str, r)) for r in table_rows or [])])
    return [m for m in marks if m not in quotable]


def _content_lines(text: str) -> list[str]:
    """Lines of the text other than structure markers (``1. <Describe a graph>:``, ``Paragraph 1:``)."""
    return [line for line in text.replace("\r\n", "\n").split("\n") if line.strip() and not _MARKER.match(line)]


def _findings(text: str, *, variant: str | None, min_words: int, max_words: int,
              table_rows: Iterable[Iterable[Any]] | None, title: str | None = None, data: str | None = None
              ) -> list[tuple[str, str]]:
    """[(mode, human-readable reason)] for one text; shared by failure_modes and gate. ``data``: the chart's
    data as the prompt gave it (hashtags quoted from it or the table are not a failure)."""
    table_rows = None if table_rows is None else [list(r) for r in table_rows]
    found: list[tuple[str, str]] = []
    lines = _content_lines(text)
    body = "\n".join(lines)
    sentences = [s for s in _SENTENCE.split(" ".join(lines)) if len(s.split()) >= 3] or [body]
    questions = sum(1 for s in sentences if s.rstrip('"\u201d ').endswith("?"))
    if questions and (questions >= 2 and questions / len(sentences) >= 0.3 or len(sentences) <= 2):
        found.append(("question_list", f"asks questions instead of describing the chart ({questions} questions)"))
    if _MARKDOWN_CHARS.search(body) and any(rx.search(body) for rx in _MARKDOWN):
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
            found.append(("missing_paragraphs", (f"{len(paragraphs)} paragraph(s); expected a "
                                                 "description, body paragraphs and an overview")))
    if refused := refusal(text):
        found.append(("refusal", f'refuses or asks for more input instead of describing the chart ("{refused}")'))
    if marks := emoji_and_hashtags(text, title, data, table_rows):
        found.append(("emoji", f"uses emoji or hashtags ({' '.join(marks[:5])})"))
    invented = invented_numbers(text, table_rows, title)
    if invented:
        shown = ", ".join(invented[:5]) + (f" (+{len(invented) - 5} more)" if len(invented) > 5 else "")
        found.append(("invented_numbers", f"numbers not in the data table: {shown}"))
    return found


def failure_modes(text: str, *, variant: str | None = None, min_words: int = 120, max_words: int = 190,
                  table_rows: Iterable[Iterable[Any]] | None = None, title: str | None = None) -> list[str]:
    """What is wrong with ``text``, as names from ``MODES`` (empty: nothing detected).

    ``variant="structured"``: the three-step structure must parse (else ``missing_paragraphs``);
    ``"unstructured"``: markers are a failure (``structure_markers``) and fewer than three prose paragraphs
    is ``missing_paragraphs``; ``None``: no structure expectation. ``invented_numbers`` needs ``table_rows``.
    """
    return [mode for mode, _ in _findings(text, variant=variant, min_words=min_words, max_words=max_words,
                                          table_rows=table_rows, title=title)]


ECHO_WORDS = 8  # a run this long copied from the prompt's instructions or examples is an echo, not an essay
_WORDS = re.compile(r"[a-z0-9']+")


@lru_cache(maxsize=64)
def _prose_words(text: str) -> tuple[str, ...]:
    return tuple(_WORDS.findall("\n".join(_content_lines(text)).lower()))


@lru_cache(maxsize=32)
def _runs(source: str, n: int) -> frozenset[tuple[str, ...]]:
    words = _prose_words(source)
    return frozenset(words[i:i + n] for i in range(len(words) - n + 1))


def copied_run(text: str, source: str, n: int = ECHO_WORDS, exclude: str = "") -> str | None:
    """The first run of ``n`` words that ``text`` shares with ``source`` outside the structure markers
    (which an essay must copy) and not inside ``exclude``; case and punctuation are ignored."""
    words, vocabulary = _prose_words(text), _vocabulary(source)
    known = 0  # consecutive words of the text that the source has: a shared run needs n of them
    starts = []
    for i, word in enumerate(words):
        known = known + 1 if word in vocabulary else 0
        if known >= n:
            starts.append(i - n + 1)
    if not starts:
        return None
    runs, excluded = _runs(source, n), _runs(exclude, n)
    return next((" ".join(run) for i in starts if (run := words[i:i + n]) in runs and run not in excluded), None)


@lru_cache(maxsize=32)
def _vocabulary(source: str) -> frozenset[str]:
    return frozenset(_prose_words(source))


# A run this long copied from the prompt's data block (table rows, OCR text) is a copy, not a description: the
# sample's 120 human summaries share at most 7 words in a row with their own chart's data (title excluded).
DATA_ECHO_WORDS = 12


def data_echo(text: str, data: str, title: str | None = None, n: int = DATA_ECHO_WORDS) -> str | None:
    """The first run of ``n`` words (numbers count as words) that ``text`` copies from ``data``, the prompt's
    data block, other than a run inside the chart's title (which an essay may quote); else None."""
    return copied_run(text, data, n, exclude=title or "")


def gate_findings(essay: str, table_rows: Iterable[Iterable[Any]] | None, cfg: TeacherSection,
                  title: str | None = None, instructions: str | None = None, data: str | None = None
                  ) -> list[tuple[str, str]]:
    """[(mode, reason)] for the teacher's gate (mode ``empty`` for an empty answer). ``instructions``: the
    prompt's fixed text (instructions, example essays, placeholder lines, without this chart's title and data,
    which an essay may quote); an answer copying a run of ``ECHO_WORDS`` words from it is an echo
    (``prompt_echo``). ``data``: the prompt's data block (table or OCR text); a run of ``DATA_ECHO_WORDS``
    words copied from it is ``data_echo``. Refusals and emoji/hashtags are rejected whatever the config."""
    if not essay or not essay.strip():
        return [("empty", "empty answer")]
    found = _findings(essay, variant="structured" if cfg.require_structure else None, min_words=cfg.min_words,
                      max_words=cfg.max_words, table_rows=table_rows if cfg.check_numbers else None, title=title,
                      data=data)
    if instructions and (run := copied_run(essay, instructions)):
        found.append(("prompt_echo", f'copies the instructions or an example instead of describing this chart '
                                     f'("{run} ...")'))
    if data and (run := data_echo(essay, data, title)):
        found.append(("data_echo", f'copies the data given in the prompt instead of describing it ("{run} ...")'))
    return found


# Findings that more text cannot undo: a copied run stays copied, a word count only grows. An answer that has one
# is rejected however it goes on, so a streamed answer can be stopped there (teacher.stop_early).
FINAL_MODES = ("prompt_echo", "data_echo", "too_long")


def final_findings(lines: str, cfg: TeacherSection, title: str | None = None, instructions: str | None = None,
                   data: str | None = None) -> list[tuple[str, str]]:
    """:func:`gate_findings` of an answer still being written, kept to ``FINAL_MODES``. ``lines``: the lines it
    has completed (a line still being written may yet turn out to be a structure marker, or end in half a word)."""
    return [f for f in gate_findings(lines, None, cfg, title, instructions, data) if f[0] in FINAL_MODES]


def gate(essay: str, table_rows: Iterable[Iterable[Any]] | None, cfg: TeacherSection,
         title: str | None = None) -> list[str]:
    """Human-readable reasons the teacher's essay fails (empty: it passes). Thresholds from ``cfg``:
    ``min_words``/``max_words``, ``require_structure`` (structured variant), ``check_numbers``."""
    return [why for _, why in gate_findings(essay, table_rows, cfg, title)]


# --------------------------------------------------------------------------- one essay, every measure


def similarity(essay: str, golden: str) -> float:
    """chrF++ (sacrebleu, 0..100) of the essay's prose against the golden essay's prose: structure markers
    and quotes are stripped from both, so the layout itself earns nothing."""
    from sacrebleu.metrics import CHRF

    return float(CHRF(word_order=2).sentence_score(_prose(essay), [_prose(golden)]).score)


def closeness(chrf: float | None, precision: float | None, has_table: bool) -> float | None:
    """The deterministic judge's score of one essay: chrF++ to the golden essay (0..1), averaged with the
    numeric precision when the chart has a table (an essay quoting no figure gets 0 there)."""
    if chrf is None:
        return None
    return (chrf / 100 + (precision or 0.0)) / 2 if has_table else chrf / 100


def score_essay(text: str, *, table_rows: Iterable[Iterable[Any]] | None = None, title: str | None = None,
                golden: str | None = None, variant: str | None = None, finish: str | None = None,
                min_words: int = 120, max_words: int = 190) -> dict[str, Any]:
    """Every measure of one essay, as the report and ``ielts-distill score`` show it: words, the three-step
    structure, failure modes (``truncated`` when ``finish == "length"``), numeric precision/coverage against
    the table, and chrF++ to the golden essay with the deterministic judge's score when one is given."""
    rows = list(table_rows or [])
    try:
        parse_structured(text)
        structure, why = True, None
    except EssayFormatError as exc:
        structure, why = False, str(exc)
    modes = failure_modes(text, variant=variant, min_words=min_words, max_words=max_words, table_rows=rows,
                          title=title)
    if finish == "length":
        modes.append("truncated")
    numeric = numeric_scores(text, rows, title)
    chrf = similarity(text, golden) if golden is not None else None
    return {"words": word_count(text), "three_step": structure, "structure_problem": why,
            "paragraphs": len(essay_paragraphs(text)), "failure_modes": modes, "finish": finish,
            "numeric": numeric, "chrf_to_golden": chrf,
            "closeness": closeness(chrf, numeric["precision"] if numeric else None, bool(rows))}
