"""Versioned prompt templates, shipped inside the package.

Teacher templates live in ``teacher/<version>/<chart type>.txt`` (bar, line, pie, table); ``pie`` is the
seed's prompt verbatim and the others follow its shape: instructions, 2–3 few-shot Band-9 examples of that
chart type in the three-step structure, then ``<TITLE_LAST>: "{title}"`` / ``[{image_name}].`` and the
final line ``Follow given structured input:``. Only ``{title}`` and ``{image_name}`` are substituted
(plain replacement, so other braces in a template are safe). Editing a template means a new version
folder: records store the template name, version and a hash of its text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from pipeline.errors import PipelineError

TEACHER_TYPES = ("bar", "line", "pie", "table")
FINAL_LINE = "Follow given structured input:"
MAX_TABLE_ROWS = 40  # rows of a chart's data table given in a prompt (the gates still check them all)
MAX_OCR_CHARS = 1000  # Pew charts have OCR text instead of a table: noisy, so only its start
# The student's prompt (student.table_in_prompt) is shorter: its sequence (image, prompt, essay) is trained
STUDENT_TABLE_ROWS, STUDENT_OCR_CHARS = 12, 400
TABLE_HEADING = "Data table of the chart (quote only figures from it):"
OCR_HEADING = "Text read from the chart image (OCR):"
NO_IMAGE = "no image: use the title and the data given"  # the image name when the prompt carries no image
FEEDBACK = ("Your previous answer was rejected: {reasons}. Write a new essay that fixes this, following the "
            "structure above.")
# The fixed lines a prompt may add to its template: an answer must not copy them either
FRAMING = "\n".join((TABLE_HEADING, OCR_HEADING, NO_IMAGE, FEEDBACK.format(reasons="")))


def table_text(rows: list[list], max_rows: int = MAX_TABLE_ROWS) -> str:
    """A data table as prompt text: one line per row, cells joined by `` | ``, at most ``max_rows`` rows."""
    shown = [" | ".join(str(c) for c in row) for row in rows[: max_rows + 1]]
    more = len(rows) - 1 - max_rows
    return "\n".join(shown) + (f"\n... ({more} more rows)" if more > 0 else "")


def chart_data(chart: dict, max_rows: int = MAX_TABLE_ROWS, max_chars: int = MAX_OCR_CHARS) -> str:
    """What a prompt says about a chart's data: its table or the start of its OCR text, each under its
    heading; '' when the chart has neither. The teacher's prompt, and with the student's limits
    (STUDENT_TABLE_ROWS, STUDENT_OCR_CHARS) the student's (``student.table_in_prompt``)."""
    if chart.get("table"):
        return f"{TABLE_HEADING}\n{table_text(chart['table'], max_rows)}"
    if chart.get("ocr_text"):
        return f"{OCR_HEADING}\n{chart['ocr_text'][:max_chars]}"
    return ""


def student_data(chart: dict) -> str:
    """The chart's data as the student's prompt gives it (``student.table_in_prompt``): ``chart_data`` with the
    student's limits. The dataset stage's ``data`` column and ``ielts-distill write --data``."""
    return chart_data(chart, STUDENT_TABLE_ROWS, STUDENT_OCR_CHARS)


def read_prompt(relpath: str) -> str:
    """The text of ``pipeline/prompts/<relpath>`` (e.g. ``"teacher/v1/pie.txt"``)."""
    node = resources.files(__name__).joinpath(*relpath.split("/"))
    try:
        return node.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise PipelineError(f"prompt template not found: pipeline/prompts/{relpath}") from None


@dataclass(frozen=True)
class Template:
    name: str  # e.g. "teacher/pie"
    version: str  # e.g. "v1"
    text: str

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    def render(self, title: str, image_name: str, extra: str = "") -> str:
        """Fill the title and image name; ``extra`` (data table, feedback) goes just before the final line."""
        text = self.text.replace("{title}", title).replace("{image_name}", image_name)
        if extra:
            head, sep, tail = text.rpartition(FINAL_LINE)
            text = f"{head}{extra.rstrip()}\n{sep}{tail}" if sep else f"{text.rstrip()}\n{extra.rstrip()}\n"
        return text


@cache
def teacher_template(chart_type: str, version: str = "v1") -> Template:
    if chart_type not in TEACHER_TYPES:
        raise PipelineError(f"no teacher template for chart type {chart_type!r} (types: {', '.join(TEACHER_TYPES)})")
    return Template(f"teacher/{chart_type}", version, read_prompt(f"teacher/{version}/{chart_type}.txt"))
