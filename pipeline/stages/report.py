"""report: turn the judge's verdicts, the generated essays and the training logs into a report.

Writes under ``<run.id>/report/``: ``summary.json`` (every number), ``report.md`` (the same, readable),
``report.html`` (one self-contained file: figures and chart images inlined as ``data:`` URIs) and the
figures as PNG files beside the Markdown. Numbers come from :mod:`pipeline.stats` (win rates, intervals,
length control) and :mod:`pipeline.quality` (failure modes, numeric faithfulness) — the same detectors
the teacher's quality gate uses, so the report and the gate never disagree.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from pipeline.context import StageContext
from pipeline.errors import ArtifactNotFound
from pipeline import artifacts
from pipeline.artifacts import ORDERS

MODEL_ORDER = ("teacher", "baseline", "structured", "unstructured")
# Which essay form each model is asked to produce (failure_modes checks structure accordingly).
MODEL_VARIANT = {"teacher": "structured", "structured": "structured", "unstructured": "unstructured"}


@dataclass
class Inputs:
    """Everything the report reads from the store, keyed for quick lookup."""

    charts: dict[str, dict[str, Any]]
    essays: dict[str, dict[str, str]]  # model ("teacher" = the golden essay) -> chart_id -> essay
    verdicts: list[dict[str, Any]]
    test_ids: list[str]
    training: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> metrics rows, loss.png

    @property
    def models(self) -> list[str]:
        known = [m for m in MODEL_ORDER if m in self.essays]
        return known + sorted(set(self.essays) - set(known))


# --------------------------------------------------------------------------- reading


def read_inputs(ctx: StageContext) -> Inputs:
    charts = artifacts.charts_by_id(ctx)
    verdicts = artifacts.verdicts(ctx)
    essays: dict[str, dict[str, str]] = defaultdict(dict)
    essays["teacher"] = artifacts.golden_essays(ctx)
    for row in artifacts.jsonl_or_empty(ctx, "generate", artifacts.GENERATED_ESSAYS):
        essays[row["model"]][row["chart_id"]] = row.get("essay") or ""
    try:
        test_ids = artifacts.split_ids(ctx, "test")
    except ArtifactNotFound:
        test_ids = sorted({v["chart_id"] for v in verdicts})
    return Inputs(charts, dict(essays), verdicts, test_ids, read_training(ctx))


def read_training(ctx: StageContext) -> dict[str, dict[str, Any]]:
    out = {}
    for variant in ctx.config.finetune.variants:
        rows = artifacts.training_metrics(ctx, variant)
        png = artifacts.loss_png(ctx, variant)
        if rows or png:
            out[variant] = {"rows": rows, "loss_png": png}
    return out


# --------------------------------------------------------------------------- numbers


def loss_series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """(step, loss) points for training and validation from finetune's metrics.jsonl rows."""
    train, val = [], []
    for r in rows:
        step = r.get("step", r.get("global_step"))
        if step is None:
            continue
        if r.get("split") in ("validation", "val", "eval"):
            if r.get("loss") is not None:
                val.append((step, float(r["loss"])))
            continue
        for key in ("val_loss", "eval_loss", "validation_loss"):
            if r.get(key) is not None:
                val.append((step, float(r[key])))
        for key in ("train_loss", "loss"):
            if r.get(key) is not None:
                train.append((step, float(r[key])))
                break
    return {"train": sorted(train), "validation": sorted(val)}


def training_summary(training: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for variant, data in training.items():
        series = loss_series(data["rows"])
        val, train = series["validation"], series["train"]
        best = min(val, key=lambda p: p[1]) if val else None
        out[variant] = {
            "final_val_loss": val[-1][1] if val else None,
            "best_val_loss": best[1] if best else None,
            "best_step": best[0] if best else None,
            "final_train_loss": train[-1][1] if train else None,
            "steps": max((s for s, _ in train + val), default=None),
            "loss_plot": f"loss-{variant}.png" if data.get("loss_png") else None,
        }
    return out


def model_quality(inputs: Inputs, min_words: int, max_words: int) -> dict[str, Any]:
    """Per model on the test charts: failure-mode counts, mean words, numeric faithfulness."""
    from pipeline.essays import word_count
    from pipeline.quality import failure_modes, numeric_faithfulness

    out = {}
    for model in inputs.models:
        texts = {cid: inputs.essays[model][cid] for cid in inputs.test_ids if cid in inputs.essays[model]}
        modes: Counter[str] = Counter()
        failing = 0
        faith = []
        for cid, text in texts.items():
            table = inputs.charts.get(cid, {}).get("table")
            found = set(failure_modes(text, variant=MODEL_VARIANT.get(model), min_words=min_words,
                                      max_words=max_words, table_rows=table))
            modes.update(found)
            failing += bool(found)
            score = numeric_faithfulness(text, table) if table else None
            if score is not None:
                faith.append(score)
        n = len(texts)
        out[model] = {
            "n": n,
            "mean_words": sum(word_count(t) for t in texts.values()) / n if n else None,
            "failure_modes": dict(sorted(modes.items())),
            "with_any_failure": failing,
            "numeric_faithfulness": sum(faith) / len(faith) if faith else None,
            "numeric_faithfulness_n": len(faith),
        }
    return out


def comparison_pairs(inputs: Inputs) -> dict[tuple[str, str], list]:
    """Judge records grouped into :class:`pipeline.stats.Pair` per comparison (both orders in one pair)."""
    from pipeline.essays import word_count
    from pipeline.stats import Pair

    grouped: dict[tuple[str, str], dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for v in inputs.verdicts:
        grouped[(v["a"], v["b"])][v["chart_id"]][v["order"]] = v["verdict"]
    out = {}
    for (a, b), by_chart in grouped.items():
        pairs = []
        for cid, orders in sorted(by_chart.items()):
            ea, eb = inputs.essays.get(a, {}).get(cid), inputs.essays.get(b, {}).get(cid)
            pairs.append(Pair(cid, inputs.charts.get(cid, {}).get("type", "unknown"),
                              tuple(orders[o] for o in ORDERS if o in orders),
                              word_count(ea) if ea is not None else None,
                              word_count(eb) if eb is not None else None))
        out[(a, b)] = pairs
    return out


def build_summary(ctx: StageContext, inputs: Inputs) -> dict[str, Any]:
    from pipeline.stats import compare

    pairs = comparison_pairs(inputs)
    wanted = [tuple(c) for c in ctx.config.judge.comparisons]
    ordered = [c for c in wanted if c in pairs] + sorted(set(pairs) - set(wanted))
    judge = ctx.config.judge_llm()
    teacher = ctx.config.teacher
    usage = Counter()
    for v in inputs.verdicts:
        usage.update({k: int(n) for k, n in (v.get("usage") or {}).items() if isinstance(n, (int, float))})
    return {
        "run_id": ctx.run_id,
        "judge": {"model": judge.model, "template": ctx.config.judge.template, "vision": judge.vision,
                  "requests": sum(int(v.get("attempts") or 1) for v in inputs.verdicts),
                  "usage": dict(usage),
                  "cost_usd": round(sum(float(v.get("cost_usd") or 0) for v in inputs.verdicts), 6)},
        "test_charts": len(inputs.test_ids),
        "comparisons": [compare(a, b, pairs[(a, b)]) for a, b in ordered],
        "models": model_quality(inputs, teacher.min_words, teacher.max_words),
        "word_limits": {"min_words": teacher.min_words, "max_words": teacher.max_words},
        "training": training_summary(inputs.training),
    }


# --------------------------------------------------------------------------- the stage


def run(ctx: StageContext) -> None:
    from pipeline.report_html import render_figures, render_html, render_markdown

    inputs = read_inputs(ctx)
    summary = build_summary(ctx, inputs)
    figures = render_figures(summary, inputs)
    for name, png in figures.items():
        ctx.store.put_bytes(ctx.key(name), png)
    ctx.store.put_text(ctx.key(artifacts.REPORT_SUMMARY), json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    ctx.store.put_text(ctx.key(artifacts.REPORT_MD), render_markdown(summary))
    ctx.store.put_text(ctx.key(artifacts.REPORT_HTML), render_html(summary, inputs, figures, ctx))
    headline = {c["comparison"]: round(c["win_rate"], 3) if c["win_rate"] is not None else None
                for c in summary["comparisons"]}
    for c in summary["comparisons"]:
        ctx.log.info("report: %s win rate %s (95%% CI %s, n=%d)", c["comparison"], _fmt(c["win_rate"]),
                     _fmt_ci(c["ci95"]), c["n"])
    ctx.log.info("report: %s", ctx.store.url(ctx.key(artifacts.REPORT_HTML)))
    ctx.complete({"comparisons": len(summary["comparisons"]), "test_charts": summary["test_charts"],
                  **{f"win_rate:{k}": v for k, v in headline.items()}})


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _fmt_ci(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
