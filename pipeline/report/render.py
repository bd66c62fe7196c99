"""Render the view-model into ``report.md`` and a self-contained ``report.html`` with jinja2 templates.

The filters only format (percent, interval, fixed digits, ``data:`` URI); every number and sentence comes
from :class:`pipeline.report.summary.ReportView`. The HTML has no external reference: figures and chart
images are ``data:`` URIs and the CSS is inline, so the file can be mailed or opened from an S3 console.
"""

from __future__ import annotations

import base64
import functools
from typing import Any

from pipeline.report.summary import ReportView, ci_text, pct


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _band_ci(ci: list[float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@functools.cache
def environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters.update(pct=pct, ci=ci_text, num=_num, data_uri=data_uri, band_ci=_band_ci)
    return env


def _context(view: ReportView, **extra: Any) -> dict[str, Any]:
    return {"s": view.summary, "gallery": view.gallery, **extra}


def render_markdown(view: ReportView) -> str:
    return environment().get_template("report.md").render(_context(view))


def render_html(view: ReportView, figures: dict[str, bytes]) -> str:
    return environment().get_template("report.html").render(_context(view, figures=figures, images=view.images))
