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
