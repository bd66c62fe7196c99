"""The report's view-model: every number and sentence of the report, computed once from the stage's inputs.

``build_view`` returns a :class:`ReportView`: ``summary`` (JSON-ready, written as ``summary.json``), the
gallery entries and the loss series for the figures. The templates in ``templates/`` only format what is
here; nothing reads the store or computes a number while rendering.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.artifacts import ORDERS, SELFTEST_GOLDEN, SELFTEST_PREFIX, VIEWS

if TYPE_CHECKING:
    from pipeline.config import RunConfig

GOLDEN = "golden"  # the golden (teacher) essays, as a model of the report
MODEL_ORDER = (GOLDEN, "baseline", "structured", "unstructured")
# Which essay form each model is asked to produce (failure_modes checks structure accordingly).
MODEL_VARIANT = {GOLDEN: "structured", "structured": "structured", "unstructured": "unstructured"}
DETERMINISTIC_MARGIN = 0.01  # closeness scores closer than this are a tie for the deterministic judge
LABELS = {GOLDEN: "golden (teacher)", "baseline": "baseline", "structured": "fine-tuned structured",
          "unstructured": "fine-tuned unstructured"}


def ordered(models) -> list[str]:
    """Models in the report's order: golden, baseline, structured, unstructured, then others by name."""
    known = [m for m in MODEL_ORDER if m in models]
    return known + sorted(set(models) - set(known))


def is_selftest(verdict: dict[str, Any]) -> bool:
    return verdict["a"] == SELFTEST_GOLDEN and verdict["b"].startswith(SELFTEST_PREFIX)


NEUTRAL, AS_WRITTEN = VIEWS
VIEW_LABELS = {NEUTRAL: "layout-neutral", AS_WRITTEN: "as written"}


def view_of(verdict: dict[str, Any]) -> str:
    """A verdict's view; records from before layout-neutral judging were judged as written."""
    return verdict.get("view") or AS_WRITTEN


def is_rubric(verdict: dict[str, Any]) -> bool:
    return verdict.get("order") == "rubric"  # pipeline.rubric.RUBRIC (judge.rubric)


@dataclass
class Inputs:
    """Everything the report reads from the store, keyed for quick lookup."""

    charts: dict[str, dict[str, Any]]
    essays: dict[str, dict[str, str]]  # model (GOLDEN = the golden essay) -> chart_id -> essay
    verdicts: list[dict[str, Any]]
    test_ids: list[str]
    training: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> metrics rows, loss.png
    generated: list[dict[str, Any]] = field(default_factory=list)  # generate's rows (finish, tokens, ...)

    @property
    def judged(self) -> list[dict[str, Any]]:
        """The verdicts of the configured comparisons (the self-test's pairs and rubric scores left out)."""
        return [v for v in self.verdicts if not (is_selftest(v) or is_rubric(v))]

    @property
    def models(self) -> list[str]:
        return ordered(self.essays)


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


Scores = dict[str, dict[str, dict[str, Any]]]  # model -> chart_id -> pipeline.quality.score_essay(...)


def essay_scores(inputs: Inputs, min_words: int, max_words: int, variant_of=lambda model: model) -> Scores:
    """Every measure of every test essay (the same code as ``ielts-distill score``), computed once;
    ``variant_of`` maps a model name to the variant it writes (an adapter of one seed to its variant)."""
    from pipeline.quality import score_essay

    finish = {(r["model"], r["chart_id"]): r.get("finish") for r in inputs.generated}
    golden = inputs.essays.get(GOLDEN, {})
    out: Scores = {}
    for model in inputs.models:
        out[model] = {}
        for cid in inputs.test_ids:
            text = inputs.essays[model].get(cid)
            if text is None:
                continue
            chart = inputs.charts.get(cid, {})
            out[model][cid] = score_essay(
                text, table_rows=chart.get("table"), title=chart.get("title"), golden=golden.get(cid),
                variant=MODEL_VARIANT.get(variant_of(model)),
                finish="stop" if model == GOLDEN else finish.get((model, cid)), min_words=min_words, max_words=max_words)
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _share(count: int, total: int) -> float | None:
    return count / total if total else None


def model_quality(scores: Scores) -> dict[str, Any]:
    """Per model on the test charts: words, three-step structure, failure modes, numeric faithfulness."""
    from pipeline.quality import SEED_MODES

    out = {}
    for model, by_chart in scores.items():
        rows = list(by_chart.values())
        n = len(rows)
        modes = Counter(m for r in rows for m in set(r["failure_modes"]))
        precision = [r["numeric"]["precision"] for r in rows if r["numeric"] and r["numeric"]["precision"] is not None]
        coverage = [r["numeric"]["coverage"] for r in rows if r["numeric"] and r["numeric"]["coverage"] is not None]
        untied = [r["numeric"]["unverifiable"] / r["numeric"]["figures"] for r in rows
                  if r["numeric"] and r["numeric"]["figures"]]
        chrf = [r["chrf_to_golden"] for r in rows if r["chrf_to_golden"] is not None]
        known = sum(r["finish"] is not None for r in rows)
        out[model] = {
            "label": LABELS.get(model, model),
            "n": n,
            "mean_words": _mean([r["words"] for r in rows]),
            "three_step_share": sum(r["three_step"] for r in rows) / n if n else None,
            "failure_modes": dict(sorted(modes.items())),
            "failure_shares": {m: _share(modes[m], known if m == "truncated" else n) for m in SEED_MODES},
            "with_any_failure": sum(bool(r["failure_modes"]) for r in rows),
            "finish_known": known,
            "numeric_precision": _mean(precision), "numeric_precision_n": len(precision),
            "numeric_coverage": _mean(coverage), "numeric_coverage_n": len(coverage),
            "numeric_unverifiable": _mean(untied),
            "chrf_to_golden": _mean(chrf) if model != GOLDEN else None,
        }
    return out


def truncation(scores: Scores, limit: float = 0.02) -> dict[str, Any]:
    """Generated essays that hit the token limit (``finish == "length"``), over those whose finish is known."""
    rows = [r for model, by_chart in scores.items() if model != GOLDEN for r in by_chart.values()]
    known = [r for r in rows if r["finish"] is not None]
    cut = sum(r["finish"] == "length" for r in known)
    share = cut / len(known) if known else None
    return {"essays": len(rows), "finish_known": len(known), "hit_limit": cut, "share": share,
            "limit": limit, "over_limit": share is not None and share > limit}


# --------------------------------------------------------------------------- comparisons


def comparison_pairs(inputs: Inputs, view: str = NEUTRAL) -> dict[tuple[str, str], list]:
    """Judge records of one view grouped into :class:`pipeline.stats.Pair` per comparison (both orders in one
    pair)."""
    from pipeline.essays import word_count
    from pipeline.stats import Pair

    grouped: dict[tuple[str, str], dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for v in inputs.judged:
        if view_of(v) != view:
            continue
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


def evidence_note(check: dict[str, Any] | None) -> str | None:
    """Why the LLM judge's win rates are not evidence (None when its self-test passed)."""
    if check is None:
        return "not evidence: the judge was not self-tested"
    return None if check["trustworthy"] else "not evidence: the judge failed its self-test"


def comparisons(config: RunConfig, pairs: dict[tuple[str, str], list], scores: Scores | None = None,
                check: dict[str, Any] | None = None, view: str = NEUTRAL) -> list[dict[str, Any]]:
    """The LLM judge's comparisons of one view, in the configured order, each with its sentence, caveats,
    the two models' cut / short shares and whether it is evidence (the self-test passed). With several
    training seeds (``finetune.seeds``): one entry per configured comparison, its seeds' pairs pooled with a
    bootstrap interval over charts and seeds, and each seed's own result in ``per_seed``."""
    from pipeline.stats import bootstrap_ci, compare

    note = evidence_note(check)
    min_words = config.teacher.min_words

    def entry(a: str, b: str, ps: list, names: tuple[list[str], list[str]], **extra: Any) -> dict[str, Any]:
        c = {**compare(a, b, ps), **extra}
        if "ci95_method" in extra:
            c["ci_includes_half"] = c["ci95"] is not None and c["ci95"][0] <= 0.5 <= c["ci95"][1]
        sentence = verdict_sentence(c) + ("" if note is None else f" ({note})")
        charts = [p.chart_id for p in ps]
        return {**c, "view": VIEW_LABELS[view], "sentence": sentence, "caveats": caveats(c),
                "lengths": {m: lengths(ns, charts, scores or {}, min_words) for m, ns in zip((a, b), names)},
                "trustworthy": None if check is None else check["trustworthy"],
                "evidence": note is None, "evidence_note": note}

    judged = [(a, b, s) for a, b, s in config.judged_comparisons() if (a, b) in pairs]
    if all(s is None for *_, s in judged):
        wanted = [(a, b) for a, b, _ in judged]
        return [{**entry(a, b, pairs[(a, b)], ([a], [b])), "seeds": 1, "per_seed": []}
                for a, b in wanted + sorted(set(pairs) - set(wanted))]
    out = []
    for base_a, base_b in (tuple(c) for c in config.judge.comparisons):
        mine = [(a, b, s) for a, b, s in judged
                if (config.finetune.unit_of(a)[0], config.finetune.unit_of(b)[0]) == (base_a, base_b)]
        if not mine:
            continue
        per_seed = [{**entry(a, b, pairs[(a, b)], ([a], [b])), "seed": s} for a, b, s in mine]
        pooled = [p for a, b, _ in mine for p in pairs[(a, b)]]
        ci = bootstrap_ci({s: pairs[(a, b)] for a, b, s in mine})
        out.append({**entry(base_a, base_b, pooled, ([a for a, *_ in mine], [b for _, b, _ in mine]), ci95=ci,
                            ci95_method="bootstrap over charts and seeds"),
                    "seeds": len(mine), "per_seed": per_seed})
    return out


def lengths(models: list[str], chart_ids: list[str], scores: Scores, min_words: int) -> dict[str, Any]:
    """Over one side of a comparison — a model, or a variant's adapters of every seed — and the pairs' charts:
    the share of essays cut at the token limit (over those whose finish is known) and under the word floor,
    so a win rate is read beside what may have decided it."""
    rows = [scores.get(m, {}).get(cid) for m in dict.fromkeys(models) for cid in dict.fromkeys(chart_ids)]
    rows = [r for r in rows if r is not None]
    known = [r for r in rows if r["finish"] is not None]
    return {"n": len(rows), "cut": _share(sum(r["finish"] == "length" for r in known), len(known)),
            "finish_known": len(known), "short": _share(sum(r["words"] < min_words for r in rows), len(rows))}


def deterministic(config: RunConfig, inputs: Inputs, scores: Scores,
                  llm_pairs: dict[tuple[str, str], list]) -> dict[str, Any]:
    """The deterministic judge: per chart, the essay closer to the golden one (chrF++ of the prose, averaged
    with numeric precision where there is a table) wins; within ``DETERMINISTIC_MARGIN`` it is a tie. Its
    comparisons, with their agreement with the LLM judge on the same charts."""
    from pipeline.stats import Pair, agreement, compare

    out = []
    for a, b, seed in config.judged_comparisons():
        pairs = []
        for cid in inputs.test_ids:
            sa, sb = scores.get(a, {}).get(cid), scores.get(b, {}).get(cid)
            if sa is None or sb is None or sa["closeness"] is None or sb["closeness"] is None:
                continue
            diff = sa["closeness"] - sb["closeness"]
            verdicts = ("a", "a") if diff > DETERMINISTIC_MARGIN else ("b", "b") if diff < -DETERMINISTIC_MARGIN \
                else ("a", "b")
            pairs.append(Pair(cid, inputs.charts.get(cid, {}).get("type", "unknown"), verdicts, sa["words"],
                              sb["words"]))
        if not pairs:
            continue
        c = compare(a, b, pairs)
        llm = {p.chart_id: p.outcome for p in llm_pairs.get((a, b), [])}
        both = [(llm[p.chart_id], p.outcome) for p in pairs if p.chart_id in llm]
        out.append({**c, "sentence": verdict_sentence(c), "caveats": caveats(c),
                    "seed": seed, "lengths": {m: lengths([m], [p.chart_id for p in pairs], scores,
                                                                 config.teacher.min_words) for m in (a, b)},
                    "agreement_with_llm": agreement([x for x, _ in both], [y for _, y in both])})
    return {"method": f"chrF++ (sacrebleu) of the prose to the golden essay's prose, averaged with numeric "
                      f"precision where the chart has a table; a difference under {DETERMINISTIC_MARGIN} is a tie",
            "margin": DETERMINISTIC_MARGIN, "comparisons": out}


# --------------------------------------------------------------------------- the judge's self-test


def _accuracy(outcomes: list[str]) -> dict[str, Any]:
    from pipeline.stats import wilson

    correct = sum(o == "win" for o in outcomes)
    counts = Counter(outcomes)
    return {"n": len(outcomes), "correct": correct, "accuracy": _share(correct, len(outcomes)),
            "ci95": wilson(correct, len(outcomes)), "flipped": counts["tie"], "wrong": counts["loss"],
            "invalid": counts["invalid"]}


def selftest(inputs: Inputs, min_accuracy: float) -> dict[str, Any] | None:
    """The judge's accuracy on planted pairs (the chart's human summary vs a copy of it made worse in a known
    way): a pair is correct when both orders pick the good text; a flip, a wrong pick or an invalid answer is
    not. The judge passes when its accuracy reaches ``min_accuracy`` overall *and* on every corruption: a
    judge blind to one kind of defect (wrong figures, say) is not certified by catching the others."""
    from pipeline.stats import combine

    grouped: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for v in inputs.verdicts:
        if is_selftest(v):
            grouped[v["b"][len(SELFTEST_PREFIX):]][v["chart_id"]][v["order"]] = v["verdict"]
    if not grouped:
        return None
    outcomes = {kind: [combine(tuple(o[x] for x in ORDERS if x in o)) for o in by_chart.values()]
                for kind, by_chart in grouped.items()}
    overall = _accuracy([o for kind in outcomes.values() for o in kind])
    by_kind = {kind: _accuracy(o) for kind, o in sorted(outcomes.items())}
    failed = [kind for kind, k in by_kind.items() if k["accuracy"] < min_accuracy]
    return {**overall, "min_accuracy": min_accuracy, "failed_corruptions": failed,
            "trustworthy": overall["accuracy"] >= min_accuracy and not failed, "by_corruption": by_kind}


# --------------------------------------------------------------------------- the IELTS rubric (optional)


def rubric(inputs: Inputs, llm_pairs: dict[tuple[str, str], list]) -> dict[str, Any] | None:
    """Per model: the judge's mean band per criterion and overall (the mean of the four), with t intervals;
    per comparison: how often the higher overall band agrees with the pairwise outcome. None without
    rubric records (``judge.rubric`` off)."""
    from pipeline.rubric import CRITERIA, NAMES
    from pipeline.stats import agreement, mean_ci

    records = [v for v in inputs.verdicts if is_rubric(v)]
    if not records:
        return None
    bands = {(v["a"], v["chart_id"]): v["bands"] for v in records if v["verdict"] == "scored"}
    overall = {key: sum(b.values()) / len(b) for key, b in bands.items()}
    models = {}
    for model in ordered({v["a"] for v in records}):
        mine = [b for (m, _), b in bands.items() if m == model]
        models[model] = {"label": LABELS.get(model, model), "scored": len(mine),
                         "invalid": sum(1 for v in records if v["a"] == model and v["verdict"] != "scored"),
                         **{k: mean_ci([b[k] for b in mine]) for k in CRITERIA},
                         "overall": mean_ci([o for (m, _), o in overall.items() if m == model])}
    agree = []
    for (a, b), pairs in llm_pairs.items():
        both = [(p.outcome, "win" if overall[(a, p.chart_id)] > overall[(b, p.chart_id)] else
                 "loss" if overall[(a, p.chart_id)] < overall[(b, p.chart_id)] else "tie")
                for p in pairs if (a, p.chart_id) in overall and (b, p.chart_id) in overall]
        agree.append({"a": a, "b": b, **agreement([x for x, _ in both], [y for _, y in both])})
    return {"criteria": {k: NAMES[k] for k in CRITERIA}, "models": models, "agreement_with_pairwise": agree}


# --------------------------------------------------------------------------- gallery


def gallery_ids(inputs: Inputs, count: int) -> list[str]:
    """Up to ``count`` judged test charts, alternating chart types so each type is shown."""
    judged = sorted({v["chart_id"] for v in inputs.judged})
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


def gallery(inputs: Inputs, scores: Scores, count: int) -> list[dict[str, Any]]:
    """Per shown chart: its essays (words, failure modes) and each comparison's verdict per order."""
    from pipeline.stats import combine

    verdicts: dict[str, dict[tuple[int, str, str], dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for v in inputs.judged:
        verdicts[v["chart_id"]][(VIEWS.index(view_of(v)), v["a"], v["b"])][v["order"]] = v["verdict"]
    out = []
    for cid in gallery_ids(inputs, count):
        chart = inputs.charts.get(cid, {})
        essays = []
        for model in inputs.models:
            score = scores.get(model, {}).get(cid)
            essays.append({"model": model, "label": LABELS.get(model, model), "text": inputs.essays[model].get(cid),
                           "modes": score["failure_modes"] if score else [],
                           "words": score["words"] if score else None})
        rows = []
        for (view, a, b), by_order in sorted(verdicts[cid].items()):
            shown = [{"a": a, "b": b}.get(by_order[o], "invalid") if o in by_order else None for o in ORDERS]
            rows.append({"comparison": f"{a} vs {b} ({VIEW_LABELS[VIEWS[view]]})", "orders": shown,
                         "outcome": combine(tuple(by_order[o] for o in ORDERS if o in by_order))})
        out.append({"chart_id": cid, "type": chart.get("type", "?"), "title": chart.get("title", ""),
                    "image": chart.get("image"), "image_format": chart.get("image_format"),
                    "essays": essays, "verdicts": rows})
    return out


# --------------------------------------------------------------------------- the view


def build_view(config: RunConfig, run_id: str, inputs: Inputs) -> ReportView:
    from pipeline.quality import SEED_MODES

    judge = config.judge_llm()
    teacher = config.teacher
    usage: Counter[str] = Counter()
    for v in inputs.verdicts:
        usage.update({k: int(n) for k, n in (v.get("usage") or {}).items() if isinstance(n, (int, float))})
    series = {v: loss_series(d["rows"]) for v, d in inputs.training.items()}
    pngs = {v: d["loss_png"] for v, d in inputs.training.items() if d.get("loss_png")}
    scores = essay_scores(inputs, teacher.min_words, teacher.max_words, lambda m: config.finetune.unit_of(m)[0])
    models = model_quality(scores)
    pairs = comparison_pairs(inputs, NEUTRAL)
    cut = truncation(scores)
    check = selftest(inputs, config.judge.selftest_min_accuracy)
    warnings = []
    if check and not check["trustworthy"]:
        failed = f" (below it on: {', '.join(check['failed_corruptions'])})" if check["failed_corruptions"] else ""
        warnings.append(f"Judge self-test: the judge preferred the good text over a planted worse copy in both "
                        f"orders in {check['correct']} of {check['n']} pairs ({pct(check['accuracy'])}, 95 % CI "
                        f"{ci_text(check['ci95'])}); judge.selftest_min_accuracy is {pct(check['min_accuracy'])} "
                        f"overall and per corruption{failed}: the LLM judge's win rates below are not evidence.")
    elif check is None and inputs.judged:
        warnings.append("No judge self-test in this run (judge.selftest_charts: 0, or verdicts from before it "
                        "existed): the LLM judge's win rates are unchecked, not evidence.")
    if cut["over_limit"]:
        warnings.append(f"{cut['hit_limit']} of {cut['finish_known']} generated essays ({pct(cut['share'])}) hit "
                        "the token limit (finish 'length'): raise generate.max_new_tokens; cut essays lose to "
                        "complete ones for that reason alone.")
    summary = {
        "run_id": run_id,
        "warnings": warnings,
        "selftest": check,
        "judging": {"model": judge.model, "template": config.judge.template, "vision": judge.vision,
                  "golden_form": config.judge.golden_form, "as_written": config.judge.as_written,
                  "requests": sum(int(v.get("attempts") or 1) for v in inputs.verdicts),
                  "usage": dict(usage),
                  "cost_usd": round(sum(float(v.get("cost_usd") or 0) for v in inputs.verdicts), 6)},
        "test_charts": len(inputs.test_ids),
        "seeds": sorted({s for *_, s in config.finetune.units()}),
        "student": {"table_in_prompt": config.student.table_in_prompt},
        "comparisons": comparisons(config, pairs, scores, check, NEUTRAL),
        "comparisons_as_written": comparisons(config, comparison_pairs(inputs, AS_WRITTEN), scores, check,
                                              AS_WRITTEN),
        "deterministic": deterministic(config, inputs, scores, pairs),
        "rubric": rubric(inputs, pairs),
        "models": models,
        "seed_modes": list(SEED_MODES),
        "failure_mode_names": sorted({m for q in models.values() for m in q["failure_modes"]}),
        "truncation": cut,
        "word_limits": {"min_words": teacher.min_words, "max_words": teacher.max_words},
        "training": training_summary(series, pngs),
    }
    return ReportView(summary, gallery(inputs, scores, config.report.gallery), series, pngs)
