"""Essay analysis shared by the teacher's gates, the dataset transform, the judge metrics and the report.

The teacher is asked for the seed's three-step structure::

    1. <Describe a graph>:
    "<one-sentence description>"

    2. <Find the key points, trends and compare data>:

    Paragraph 1:
    "<body paragraph>"
    ...

    3. <Write a summary of presented data>:
    "<overview>"

Real output is messier, so the parser accepts: the pie prompt's ``<Describe a graph:>`` wording and other
header wordings (a header is recognised by its step number or by its words), the colon inside or outside
the angle brackets, bare ``1. Describe a graph:`` headers, markdown bold/``#`` around markers,
``Paragraph 1:`` / ``Paragraph1:`` / ``**Paragraph 1:**``, paragraphs with or without straight or curly
quotes, CRLF line ends and trailing spaces. Text before the first header (an echoed title, "Here is the
essay:") is dropped. Blank lines and ``Paragraph N:`` labels separate body paragraphs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

CANONICAL_HEADERS = (
    "1. <Describe a graph>:",
    "2. <Find the key points, trends and compare data>:",
    "3. <Write a summary of presented data>:",
)
_STEP_NAMES = ("graph description", "key points", "summary")

_B = r"(?:\*\*|__)?"  # optional markdown bold around a marker
_STEP = re.compile(
    rf"^\s*(?:#+\s*)?{_B}\s*(?:(?:[Ss]tep\s*)?(?P<num>[1-3])\s*[.):]\s*)?{_B}\s*"
    rf"(?:<\s*(?P<angled>[^<>\n]{{1,80}}?)\s*:?\s*>|(?P<bare>[A-Za-z][A-Za-z ,/&-]{{2,60}}?)\s*(?={_B}\s*:))"
    rf"\s*{_B}\s*:?\s*{_B}\s*(?P<rest>.*)$")
_PARA = re.compile(rf"^\s*(?:#+\s*)?{_B}\s*(?:body\s+)?paragraph\s*\d+\s*(?:\([^()\n]{{0,60}}\)\s*)?{_B}\s*"
                   rf"(?:[:.)\-\u2013\u2014]\s*{_B}\s*(?P<rest>.*)|$)", re.IGNORECASE)
_WORDS = (  # step 1, 2, 3: words that name the step when a header has no number
    re.compile(r"describ|graph description|introduc", re.IGNORECASE),
    re.compile(r"key points|trends|body|compar", re.IGNORECASE),
    re.compile(r"summar|overview|conclu", re.IGNORECASE),
)
_OPENERS = set('"\u201c\u201e\u00ab')  # straight and curly double quotes, low-9 and guillemet
_CLOSERS = set('"\u201d\u201c\u00bb')


class EssayFormatError(ValueError):
    """The text has no recognisable three-step structure; the message is one line saying why."""


@dataclass
class StructuredEssay:
    description: str
    paragraphs: list[str]
    overview: str

    def prose(self) -> list[str]:
        return [self.description, *self.paragraphs, self.overview]


def _lines(text: str) -> list[str]:
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return [line.rstrip() for line in text.split("\n")]


def _step_of(line: str) -> tuple[int, str] | None:
    """(step 1..3, rest of the line) when the line is a step header, else None."""
    if "<" not in line and ":" not in line:  # _STEP needs one: most lines are prose, tried cheaply
        return None
    m = _STEP.match(line)
    if not m:
        return None
    words = m["angled"] or m["bare"]
    by_words = next((step for step in (1, 3, 2) if _WORDS[step - 1].search(words)), None)
    if m["angled"] is not None:
        step = int(m["num"]) if m["num"] else by_words
    else:  # a bare header needs both its number and words that agree with it
        step = by_words if m["num"] and by_words == int(m["num"]) else None
    return (step, m["rest"]) if step else None


def _unquote(block: str) -> str:
    """Collapse whitespace; drop the quotes around the block (or one unbalanced quote at an end)."""
    text = " ".join(block.split())  # runs of whitespace as one space (str.split's whitespace is re's \s)
    if len(text) >= 2 and text[0] in _OPENERS and text[-1] in _CLOSERS:
        return text[1:-1].strip()
    if sum(text.count(q) for q in _OPENERS | _CLOSERS) % 2 == 1:
        if text[:1] in _OPENERS:
            return text[1:].strip()
        if text[-1:] in _CLOSERS:
            return text[:-1].strip()
    return text


def _blocks(lines: list[str], split_labels: bool) -> list[str]:
    """Prose blocks separated by blank lines (and by ``Paragraph N:`` labels), unquoted, empties dropped."""
    blocks: list[list[str]] = [[]]
    for line in lines:
        label = _PARA.match(line) if split_labels else None
        if label or not line.strip():
            blocks.append([])
            line = (label["rest"] or "") if label else ""
        if line.strip():
            blocks[-1].append(line.strip())
    return [b for b in (_unquote(" ".join(block)) for block in blocks if block) if b]


def parse_structured(text: str) -> StructuredEssay:
    """Parse the three-step structure. Raises EssayFormatError with a one-line reason."""
    parsed = _parse(text)
    if isinstance(parsed, str):
        raise EssayFormatError(parsed)
    return StructuredEssay(parsed[0], list(parsed[1]), parsed[2])


# The gate, the word count and the numeric check each parse the same answer: parsed once (a few answers are
# in flight at a time; the entries are immutable).
@lru_cache(maxsize=256)
def _parse(text: str) -> tuple[str, tuple[str, ...], str] | str:
    """(description, paragraphs, overview), or why the text has no three-step structure."""
    if not text or not text.strip():
        return "empty essay"
    sections: dict[int, list[str]] = {}
    current: int | None = None
    for line in _lines(text):
        header = _step_of(line)
        if header:
            step, rest = header
            if step in sections:
                return f"step {step} ({_STEP_NAMES[step - 1]}) header appears twice"
            if current is not None and step < current:
                return f"step {step} ({_STEP_NAMES[step - 1]}) comes after step {current}"
            sections[step], current = [rest], step
        elif current is not None:
            sections[current].append(line)
    if not sections:
        return ("no step headers found (expected '1. <Describe a graph>:', "
                "'2. <Find the key points...>:', '3. <Write a summary...>:')")
    if 2 not in sections and 1 in sections:  # body paragraphs labelled but step 2's header forgotten
        first = next((i for i, line in enumerate(sections[1]) if _PARA.match(line)), None)
        if first is not None:
            sections[1], sections[2] = sections[1][:first], sections[1][first:]
    missing = [s for s in (1, 2, 3) if s not in sections]
    if missing:
        return "missing " + ", ".join(f"step {s} ({_STEP_NAMES[s - 1]})" for s in missing)
    description = " ".join(_blocks(sections[1], split_labels=False))
    paragraphs = _blocks(sections[2], split_labels=True)
    overview = " ".join(_blocks(sections[3], split_labels=False))
    for step, value in ((1, description), (2, paragraphs), (3, overview)):
        if not value:
            return f"step {step} ({_STEP_NAMES[step - 1]}) is empty"
    return description, tuple(paragraphs), overview


def unstructure(text: str) -> str:
    """The essay as plain prose: description, body paragraphs, overview, separated by one blank line.

    No trailing newline (the CLI adds one). Raises EssayFormatError when the structure is unrecognisable.
    """
    return "\n\n".join(parse_structured(text).prose())


def canonical(essay: StructuredEssay) -> str:
    """The seed's record layout for an already parsed essay (no trailing newline)."""
    body = "\n\n".join(f'Paragraph {i}:\n"{p}"' for i, p in enumerate(essay.paragraphs, 1))
    return (f'{CANONICAL_HEADERS[0]}\n"{essay.description}"\n\n{CANONICAL_HEADERS[1]}\n\n{body}\n\n'
            f'{CANONICAL_HEADERS[2]}\n"{essay.overview}"')


def to_canonical(text: str) -> str:
    """Rewrite a structured essay in the one canonical layout (the seed's example record)."""
    return canonical(parse_structured(text))


def essay_paragraphs(text: str) -> list[str]:
    """The prose paragraphs: parsed steps when the text is structured, else its blank-line blocks."""
    return list(_paragraphs(text))


@lru_cache(maxsize=256)
def _paragraphs(text: str) -> tuple[str, ...]:
    parsed = _parse(text)
    if isinstance(parsed, tuple):
        return (parsed[0], *parsed[1], parsed[2])
    return tuple(" ".join(b.split()) for b in "\n".join(_lines(text)).split("\n\n") if b.strip())


_WORD = re.compile(r"\S*?[^\W_]\S*")  # a whitespace-separated token with a letter or digit (str.isalnum)


def word_count(text: str) -> int:
    """Words of the essay's prose (step headers, paragraph labels and quotes excluded).

    A word is a whitespace-separated token with at least one letter or digit, so "4,751,653" and
    "1989" count once and a lone dash does not (close to how IELTS examiners count).
    """
    return sum(len(_WORD.findall(p)) for p in _paragraphs(text))


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"\u201d]?\s+(?=[\"\u201c(]?[A-Z0-9])")


def structure_of(essay: str, infer: str) -> tuple[StructuredEssay, bool]:
    """(steps, inferred): an essay without step markers is read as first / middle / last paragraph
    (``infer="paragraphs"``), or, when it has fewer than 3 paragraphs, first / middle / last sentence
    (``infer="sentences"``). Raises EssayFormatError when no three parts can be found."""
    try:
        return parse_structured(essay), False
    except EssayFormatError:
        parts = essay_paragraphs(essay)
        if infer == "sentences" and len(parts) < 3:
            parts = [s.strip() for s in _SENTENCE_END.split(" ".join(parts)) if s.strip()]
            if len(parts) >= 3:
                return StructuredEssay(parts[0], [" ".join(parts[1:-1])], parts[-1]), True
        if infer == "off" or len(parts) < 3:
            raise
        return StructuredEssay(parts[0], parts[1:-1], parts[-1]), True


def usable(essay: str, infer: str) -> bool:
    """Whether the dataset can train on an accepted essay: its three steps parse or can be inferred
    (``dataset.infer_structure``). The teacher counts only these when it draws charts until enough."""
    try:
        structure_of(essay, infer)
    except EssayFormatError:
        return False
    return True


FORMS = ("prose", "structured")  # the layouts a text can be shown to the judge in


def prose_form(text: str) -> str:
    """The text as plain prose paragraphs (one blank line between them): step headers, ``Paragraph N:``
    labels and the quotes around blocks stripped, also where the three steps do not all parse."""
    try:
        return "\n\n".join(parse_structured(text).prose())
    except EssayFormatError:
        lines: list[str] = []
        for line in _lines(text or ""):
            header = _step_of(line)
            lines += ["", header[1]] if header else [line]
        return "\n\n".join(_blocks(lines, split_labels=True))


def structured_form(text: str) -> str:
    """The text in the seed's canonical three-step layout: parsed when it has the markers, else its
    paragraphs (or sentences) read as description / body / overview; a text of one or two sentences keeps
    them as description and overview under the markers."""
    try:
        return canonical(structure_of(text, "sentences")[0])
    except EssayFormatError:
        parts = [s.strip() for s in _SENTENCE_END.split(" ".join(essay_paragraphs(text))) if s.strip()] or [""]
        return canonical(StructuredEssay(parts[0], [], parts[-1] if len(parts) > 1 else ""))


def in_form(text: str, form: str) -> str:
    """``text`` in the layout ``form`` (``prose`` or ``structured``, see :data:`FORMS`)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r} (expected {' or '.join(FORMS)})")
    return prose_form(text) if form == "prose" else structured_form(text)


def pair_form(golden_form: str, models: tuple[str, ...] = ()) -> str:
    """The one layout of a judged pair (``judge.golden_form``): ``prose``, ``structured``, or for
    ``variant`` structured when the fine-tuned model(s) among ``models`` are all the structured one, else prose."""
    if golden_form in FORMS:
        return golden_form
    if golden_form != "variant":
        raise ValueError(f"unknown golden form {golden_form!r} (expected prose, structured or variant)")
    return "structured" if {m for m in models if m in ("structured", "unstructured")} == {"structured"} else "prose"


def golden_view(text: str, form: str, models: tuple[str, ...] = ()) -> str:
    """The golden essay as the judge is shown it when the candidates are shown as written
    (``judge.golden_form``): ``structured`` as the teacher wrote it; ``prose`` its paragraphs without step
    headers, labels or quotes; ``variant`` (:func:`pair_form`) structured or prose by the pair's models."""
    return text if pair_form(form, models) == "structured" else prose_form(text)
