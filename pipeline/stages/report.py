"""report: turn the judge's verdicts, the generated essays and the training logs into a report.

Writes under ``<run.id>/report/``: ``summary.json`` (every number), ``report.md`` (the same, readable),
``report.html`` (one self-contained file: figures and chart images inlined as ``data:`` URIs) and the
figures as PNG files beside the Markdown. This stage only reads (via :mod:`pipeline.artifacts`), builds the
view-model (:mod:`pipeline.report.summary`), renders (:mod:`pipeline.report.render`) and writes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from pipeline import artifacts
from pipeline.context import StageContext
from pipeline.errors import ArtifactNotFound
from pipeline.report.summary import GOLDEN, Inputs


def read_inputs(ctx: StageContext) -> Inputs:
    charts = artifacts.charts_by_id(ctx)
    verdicts = artifacts.verdicts(ctx)
    essays: dict[str, dict[str, str]] = defaultdict(dict)
    essays[GOLDEN] = artifacts.golden_essays(ctx)
    generated = artifacts.jsonl_or_empty(ctx, "generate", artifacts.GENERATED_ESSAYS)
    for row in generated:
        essays[row["model"]][row["chart_id"]] = row.get("essay") or ""
    try:
        test_ids = artifacts.split_ids(ctx, "test")
    except ArtifactNotFound:
        test_ids = sorted({v["chart_id"] for v in verdicts})
    return Inputs(charts, dict(essays), verdicts, test_ids, read_training(ctx), generated)


def read_training(ctx: StageContext) -> dict[str, dict[str, Any]]:
    out = {}
    for variant in (name for name, _, _ in ctx.config.finetune.units()):
        rows = artifacts.training_metrics(ctx, variant)
        png = artifacts.loss_png(ctx, variant)
        if rows or png:
            out[variant] = {"rows": rows, "loss_png": png}
    return out


def run(ctx: StageContext) -> None:
    from pipeline.llm import image_mime
    from pipeline.report.figures import render_figures
    from pipeline.report.render import render_html, render_markdown
    from pipeline.report.summary import build_view, ci_text, pct

    view = build_view(ctx.config, ctx.run_id, read_inputs(ctx))
    view.images = {g["chart_id"]: (ctx.store.get_bytes(g["image"]), image_mime(g["image_format"]))
                   for g in view.gallery if g["image"] and ctx.store.exists(g["image"])}
    summary = view.summary
    figures = render_figures(view)
    for name, png in figures.items():
        ctx.store.put_bytes(ctx.key(name), png)
    ctx.store.put_text(ctx.key(artifacts.REPORT_SUMMARY), json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    ctx.store.put_text(ctx.key(artifacts.REPORT_MD), render_markdown(view))
    ctx.store.put_text(ctx.key(artifacts.REPORT_HTML), render_html(view, figures))
    st = summary["selftest"]
    if st:
        ctx.log.info("report: judge self-test %s: %d of %d planted pairs (%s, 95%% CI %s)%s",
                     "passed" if st["trustworthy"] else "FAILED", st["correct"], st["n"], pct(st["accuracy"]),
                     ci_text(st["ci95"]), "".join(f"; {k} {v['correct']}/{v['n']}" for k, v in st["by_corruption"].items()))
    for c in summary["comparisons"] + summary["comparisons_as_written"]:
        ctx.log.info("report: %s win rate %s (95%% CI %s, n=%d, %s)%s", c["comparison"],
                     "n/a" if c["win_rate"] is None else f"{c['win_rate']:.3f}", ci_text(c["ci95"]), c["n"], c["view"],
                     "" if c["evidence"] else f" -- {c['evidence_note'].upper()}")
    ctx.log.info("report: %s", ctx.store.url(ctx.key(artifacts.REPORT_HTML)))
    ctx.complete({"comparisons": len(summary["comparisons"]), "test_charts": summary["test_charts"],
                  "win_rates_are_evidence": bool(summary["comparisons"]) and summary["comparisons"][0]["evidence"],
                  **{f"win_rate:{c['comparison']}": None if c["win_rate"] is None else round(c["win_rate"], 3)
                     for c in summary["comparisons"]}})
