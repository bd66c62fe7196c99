"""The report's view-model: every number and sentence of the report, computed once from the stage's inputs.

``build_view`` returns a :class:`ReportView`: ``summary`` (JSON-ready, written as ``summary.json``), the
gallery entries and the loss series for the figures. The templates in ``templates/`` only format what is
here; nothing reads the store or computes a number while rendering.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.artifacts import ORDERS

if TYPE_CHECKING:
    from pipeline.config import RunConfig

MODEL_ORDER = ("teacher", "baseline", "structured", "unstructured")
# Which essay form each model is asked to produce (failure_modes checks structure accordingly).
MODEL_VARIANT = {"teacher": "structured", "structured": "structured", "unstructured": "unstructured"}
LABELS = {"teacher": "golden (teacher)", "baseline": "baseline", "structured": "fine-tuned structured",
          "unstructured": "fine-tuned unstructured"}


@dataclass
class Inputs:
    """Everything the report reads from the store, keyed for quick lookup."""

    charts: dict[str, dict[str, Any]]
    essays: dict[str, dict[str, str]]  # model ("teacher" = the golden essay) -> chart_id -> essay
    verdicts: list[dict[str, Any]]
    test_ids: list[str]
    training: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> metrics rows, loss.png
    generated: list[dict[str, Any]] = field(default_factory=list)  # generate's rows (finish, tokens, ...)

    @property
    def models(self) -> list[str]:
        known = [m for m in MODEL_ORDER if m in self.essays]
        return known + sorted(set(self.essays) - set(known))


@dataclass
class ReportView:
    summary: dict[str, Any]  # every number (summary.json)
    gallery: list[dict[str, Any]]  # sample charts: essays, failure modes, verdicts per order
    loss_series: dict[str, dict[str, list[tuple[float, float]]]]  # variant -> train/validation points
    loss_pngs: dict[str, bytes] = field(default_factory=dict)  # variant -> finetune's own loss.png
    images: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # chart_id -> (image, mime), by the stage


# --------------------------------------------------------------------------- training


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


def training_summary(series: dict[str, dict[str, list[tuple[float, float]]]],
                     pngs: dict[str, bytes]) -> dict[str, Any]:
    out = {}
    for variant, s in series.items():
        val, train = s["validation"], s["train"]
        best = min(val, key=lambda p: p[1]) if val else None
        out[variant] = {
            "final_val_loss": val[-1][1] if val else None,
            "best_val_loss": best[1] if best else None,
            "best_step": best[0] if best else None,
            "final_train_loss": train[-1][1] if train else None,
            "steps": max((s for s, _ in train + val), default=None),
            "loss_plot": f"loss-{variant}.png" if pngs.get(variant) else None,
        }
    return out


# --------------------------------------------------------------------------- essays per model


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
            "label": LABELS.get(model, model),
            "n": n,
            "mean_words": sum(word_count(t) for t in texts.values()) / n if n else None,
            "failure_modes": dict(sorted(modes.items())),
            "with_any_failure": failing,
            "numeric_faithfulness": sum(faith) / len(faith) if faith else None,
            "numeric_faithfulness_n": len(faith),
        }
    return out


# --------------------------------------------------------------------------- comparisons


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


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def ci_text(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def verdict_sentence(c: dict[str, Any]) -> str:
    """One line saying what the interval allows us to conclude."""
    if c["win_rate"] is None:
        return f"{c['a']} vs {c['b']}: no valid verdicts."
    if c["ci_includes_half"]:
        return (f"{c['a']} vs {c['b']}: the 95 % interval {ci_text(c['ci95'])} includes 50 %: on this sample the "
                "judge cannot tell the two apart.")
    better = c["a"] if c["ci95"][0] > 0.5 else c["b"]
    return f"{c['a']} vs {c['b']}: the 95 % interval {ci_text(c['ci95'])} excludes 50 %: {better} is preferred."


def caveats(c: dict[str, Any]) -> list[str]:
    """Warnings a reader needs before trusting the rate: position bias, invalid answers, length control."""
    out = []
    swap = c["swap_consistency"]
    if swap is not None and swap < 0.5:
        out.append(f"{c['a']} vs {c['b']}: swap consistency {pct(swap)}: most verdicts follow the position, "
                   "not the essays (they count as ties); a stronger judge is needed.")
    if c["n"] and c["invalid"] / c["n"] > 0.2:
        out.append(f"{c['a']} vs {c['b']}: {c['invalid']} of {c['n']} pairs invalid: the judge does not follow "
                   "the answer format.")
    if c["length_controlled"]["note"]:
        out.append(f"{c['a']} vs {c['b']}: length-controlled rate: {c['length_controlled']['note']}")
    return out


def comparisons(config: RunConfig, inputs: Inputs) -> list[dict[str, Any]]:
    """The LLM judge's comparisons, in the configured order, each with its sentence and caveats."""
    from pipeline.stats import compare

    pairs = comparison_pairs(inputs)
    wanted = [tuple(c) for c in config.judge.comparisons]
    ordered = [c for c in wanted if c in pairs] + sorted(set(pairs) - set(wanted))
    out = []
    for a, b in ordered:
        c = compare(a, b, pairs[(a, b)])
        out.append({**c, "sentence": verdict_sentence(c), "caveats": caveats(c)})
    return out


# --------------------------------------------------------------------------- gallery


def gallery_ids(inputs: Inputs, count: int) -> list[str]:
    """Up to ``count`` judged test charts, alternating chart types so each type is shown."""
    judged = sorted({v["chart_id"] for v in inputs.verdicts})
    by_type: dict[str, list[str]] = {}
    for cid in judged:
        by_type.setdefault(inputs.charts.get(cid, {}).get("type", "unknown"), []).append(cid)
    picked: list[str] = []
    queues = [list(ids) for _, ids in sorted(by_type.items())]
    while len(picked) < count and any(queues):
        for q in queues:
            if q and len(picked) < count:
                picked.append(q.pop(0))
    return picked


def gallery(inputs: Inputs, count: int, min_words: int, max_words: int) -> list[dict[str, Any]]:
    """Per shown chart: its essays (words, failure modes) and each comparison's verdict per order."""
    from pipeline.essays import word_count
    from pipeline.quality import failure_modes
    from pipeline.stats import combine

    verdicts: dict[str, dict[tuple[str, str], dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for v in inputs.verdicts:
        verdicts[v["chart_id"]][(v["a"], v["b"])][v["order"]] = v["verdict"]
    out = []
    for cid in gallery_ids(inputs, count):
        chart = inputs.charts.get(cid, {})
        essays = []
        for model in inputs.models:
            text = inputs.essays[model].get(cid)
            modes = [] if text is None else failure_modes(text, variant=MODEL_VARIANT.get(model),
                                                          min_words=min_words, max_words=max_words,
                                                          table_rows=chart.get("table"))
            essays.append({"model": model, "label": LABELS.get(model, model), "text": text, "modes": modes,
                           "words": None if text is None else word_count(text)})
        rows = []
        for (a, b), by_order in sorted(verdicts[cid].items()):
            shown = [{"a": a, "b": b}.get(by_order[o], "invalid") if o in by_order else None for o in ORDERS]
            rows.append({"comparison": f"{a} vs {b}", "orders": shown,
                         "outcome": combine(tuple(by_order[o] for o in ORDERS if o in by_order))})
        out.append({"chart_id": cid, "type": chart.get("type", "?"), "title": chart.get("title", ""),
                    "image": chart.get("image"), "image_format": chart.get("image_format"),
                    "essays": essays, "verdicts": rows})
    return out


# --------------------------------------------------------------------------- the view


def build_view(config: RunConfig, run_id: str, inputs: Inputs) -> ReportView:
    judge = config.judge_llm()
    teacher = config.teacher
    usage: Counter[str] = Counter()
    for v in inputs.verdicts:
        usage.update({k: int(n) for k, n in (v.get("usage") or {}).items() if isinstance(n, (int, float))})
    series = {v: loss_series(d["rows"]) for v, d in inputs.training.items()}
    pngs = {v: d["loss_png"] for v, d in inputs.training.items() if d.get("loss_png")}
    models = model_quality(inputs, teacher.min_words, teacher.max_words)
    summary = {
        "run_id": run_id,
        "judge": {"model": judge.model, "template": config.judge.template, "vision": judge.vision,
                  "requests": sum(int(v.get("attempts") or 1) for v in inputs.verdicts),
                  "usage": dict(usage),
                  "cost_usd": round(sum(float(v.get("cost_usd") or 0) for v in inputs.verdicts), 6)},
        "test_charts": len(inputs.test_ids),
        "comparisons": comparisons(config, inputs),
        "models": models,
        "failure_mode_names": sorted({m for q in models.values() for m in q["failure_modes"]}),
        "word_limits": {"min_words": teacher.min_words, "max_words": teacher.max_words},
        "training": training_summary(series, pngs),
    }
    return ReportView(summary, gallery(inputs, config.report.gallery, teacher.min_words, teacher.max_words),
                      series, pngs)
