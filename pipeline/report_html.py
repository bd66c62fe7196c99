"""Rendering of the report: matplotlib figures, ``report.md`` and a self-contained ``report.html``.

Everything here reads the summary dict built by :mod:`pipeline.stages.report` (plus the inputs for the
gallery); no number is computed twice. The HTML has no external reference: figures and chart images are
``data:`` URIs and the CSS is inline, so the file can be mailed or opened from an S3 console.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

LABELS = {"teacher": "golden (teacher)", "baseline": "baseline", "structured": "fine-tuned structured",
          "unstructured": "fine-tuned unstructured"}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _ci(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def verdict_sentence(c: dict[str, Any]) -> str:
    """One line saying what the interval allows us to conclude."""
    if c["win_rate"] is None:
        return f"{c['a']} vs {c['b']}: no valid verdicts."
    if c["ci_includes_half"]:
        return (f"{c['a']} vs {c['b']}: the 95 % interval {_ci(c['ci95'])} includes 50 %: on this sample the "
                "judge cannot tell the two apart.")
    better = c["a"] if c["ci95"][0] > 0.5 else c["b"]
    return f"{c['a']} vs {c['b']}: the 95 % interval {_ci(c['ci95'])} excludes 50 %: {better} is preferred."


def caveats(c: dict[str, Any]) -> list[str]:
    """Warnings a reader needs before trusting the rate: position bias, invalid answers, length control."""
    out = []
    swap = c["swap_consistency"]
    if swap is not None and swap < 0.5:
        out.append(f"{c['a']} vs {c['b']}: swap consistency {_pct(swap)}: most verdicts follow the position, "
                   "not the essays (they count as ties); a stronger judge is needed.")
    if c["n"] and c["invalid"] / c["n"] > 0.2:
        out.append(f"{c['a']} vs {c['b']}: {c['invalid']} of {c['n']} pairs invalid: the judge does not follow "
                   "the answer format.")
    if c["length_controlled"]["note"]:
        out.append(f"{c['a']} vs {c['b']}: length-controlled rate: {c['length_controlled']['note']}")
    return out


# --------------------------------------------------------------------------- figures


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def win_rate_figure(comparisons: list[dict[str, Any]]) -> bytes | None:
    """Win rate with its 95 % interval per comparison, overall and per chart type; LC rate as a diamond."""
    if not comparisons:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(comparisons), figsize=(4.2 * len(comparisons), 3.6), sharey=True,
                             squeeze=False)
    for ax, c in zip(axes[0], comparisons):
        groups = [("all", c)] + list(c["by_type"].items())
        xs = range(len(groups))
        rates = [g["win_rate"] if g["win_rate"] is not None else float("nan") for _, g in groups]
        low = [max(0.0, r - g["ci95"][0]) if g["ci95"] else 0 for r, (_, g) in zip(rates, groups)]
        high = [max(0.0, g["ci95"][1] - r) if g["ci95"] else 0 for r, (_, g) in zip(rates, groups)]
        colors = ["#3b6ea8" if name == "all" else "#8fb3d9" for name, _ in groups]
        ax.bar(xs, rates, color=colors, yerr=[low, high], capsize=4, ecolor="#222")
        lc = [g["length_controlled"]["win_rate"] for _, g in groups]
        ax.scatter([x for x, v in zip(xs, lc) if v is not None], [v for v in lc if v is not None],
                   marker="D", color="#d9822b", zorder=3, label="length-controlled")
        ax.axhline(0.5, color="#888", linestyle="--", linewidth=1)
        ax.set_xticks(list(xs), [f"{name}\nn={g['n']}" for name, g in groups], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{c['a']} vs {c['b']}", fontsize=10)
    axes[0][0].set_ylabel(f"win rate of the first model (95 % CI)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8, frameon=False)
    return _png(fig)


def loss_figure(training_rows: dict[str, list[dict[str, Any]]]) -> bytes | None:
    """Training and validation loss of every variant on one plot."""
    from pipeline.stages.report import loss_series

    series = {v: loss_series(rows) for v, rows in training_rows.items()}
    if not any(s["train"] or s["validation"] for s in series.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, (variant, s) in enumerate(sorted(series.items())):
        color = f"C{i}"
        if s["train"]:
            ax.plot(*zip(*s["train"]), color=color, alpha=0.6, label=f"{variant} train")
        if s["validation"]:
            ax.plot(*zip(*s["validation"]), color=color, marker="o", linewidth=2, label=f"{variant} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def render_figures(summary: dict[str, Any], inputs) -> dict[str, bytes]:
    """PNG files to store beside report.md: ``win_rates.png``, ``loss_curves.png``, ``loss-<variant>.png``."""
    out = {}
    win = win_rate_figure(summary["comparisons"])
    if win:
        out["win_rates.png"] = win
    loss = loss_figure({v: d["rows"] for v, d in inputs.training.items()})
    if loss:
        out["loss_curves.png"] = loss
    for variant, data in inputs.training.items():
        if data.get("loss_png"):
            out[f"loss-{variant}.png"] = data["loss_png"]
    return out


# --------------------------------------------------------------------------- markdown


def _comparison_rows(c: dict[str, Any], label: str) -> str:
    lc = c["length_controlled"]
    return (f"| {label} | {c['n']} | {c['wins']} / {c['losses']} / {c['ties']} / {c['invalid']} | "
            f"{_pct(c['win_rate'])} | {_ci(c['ci95'])} | {_pct(lc['win_rate'])} | "
            f"{_pct(c['swap_consistency'])} | {'yes' if c['ci_includes_half'] else 'no'} |")


def render_markdown(summary: dict[str, Any]) -> str:
    j = summary["judge"]
    lines = [f"# ielts-distill report: run `{summary['run_id']}`", "",
             f"Judge: `{j['model']}` (template `{j['template']}`, image {'attached' if j['vision'] else 'not attached'}), "
             f"{j['requests']} requests, ${j['cost_usd']:.4f}. Test charts: {summary['test_charts']}. "
             "Every pair was judged in both orders; a verdict that flips with the order counts as a tie; "
             "invalid answers (neither or both named, after one retry) are excluded from the rates.", "",
             "## Win rates", "",
             "| comparison | n | wins / losses / ties / invalid | win rate | 95 % CI (Wilson) | length-controlled "
             "| swap consistency | CI includes 50 % |",
             "|---|---|---|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        lines.append(_comparison_rows(c, f"**{c['a']} vs {c['b']}**"))
        for t, tc in c["by_type"].items():
            lines.append(_comparison_rows(tc, f"&nbsp;&nbsp;{t}"))
    lines += [""] + [f"- {verdict_sentence(c)}" for c in summary["comparisons"]]
    lines += [f"- {line}" for c in summary["comparisons"] for line in caveats(c)]
    lines += ["", "![win rates](win_rates.png)", ""]
    lines += _markdown_quality(summary) + _markdown_training(summary)
    return "\n".join(lines) + "\n"


def _markdown_quality(summary: dict[str, Any]) -> list[str]:
    models = summary["models"]
    modes = sorted({m for q in models.values() for m in q["failure_modes"]})
    lim = summary["word_limits"]
    lines = ["## Essays per model (test split)", "",
             f"Failure modes from `pipeline.quality` (too_short < {lim['min_words']} words, too_long > "
             f"{lim['max_words']} words). Numeric faithfulness: share of the essay's numbers found in the "
             "chart's data table (charts with a table only).", "",
             "| model | essays | mean words | any failure | " + " | ".join(modes) + " | numeric faithfulness |",
             "|---|---|---|---|" + "---|" * len(modes) + "---|"]
    for model, q in models.items():
        cells = " | ".join(str(q["failure_modes"].get(m, 0)) for m in modes)
        lines.append(f"| {LABELS.get(model, model)} | {q['n']} | {_num(q['mean_words'], 1)} | "
                     f"{q['with_any_failure']} | {cells}{' | ' if modes else ''}"
                     f"{_pct(q['numeric_faithfulness'])} (n={q['numeric_faithfulness_n']}) |")
    return lines + [""]


def _markdown_training(summary: dict[str, Any]) -> list[str]:
    training = summary["training"]
    if not training:
        return ["## Training", "", "No finetune metrics found.", ""]
    lines = ["## Training", "", "| variant | steps | final train loss | final validation loss | best validation "
             "loss (step) |", "|---|---|---|---|---|"]
    for variant, t in training.items():
        lines.append(f"| {variant} | {t['steps'] if t['steps'] is not None else 'n/a'} | "
                     f"{_num(t['final_train_loss'])} | {_num(t['final_val_loss'])} | "
                     f"{_num(t['best_val_loss'])} ({t['best_step'] if t['best_step'] is not None else 'n/a'}) |")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    lines += [f"![{v} loss]({t['loss_plot']})" for v, t in training.items() if t["loss_plot"]]
    return lines + [""]


# --------------------------------------------------------------------------- html

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1400px;
 color:#1d2330;background:#fff;padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:2px solid #e3e7ee;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}
th,td{border:1px solid #d5dae3;padding:.3rem .55rem;text-align:right;vertical-align:top}
th{background:#f1f4f8}td:first-child,th:first-child{text-align:left}
tr.sub td{color:#555;font-size:.85rem}tr.sub td:first-child{padding-left:1.6rem}
.note{color:#555}.flag{color:#b23b3b;font-weight:600}.ok{color:#2e7d32;font-weight:600}
img.fig{max-width:100%;border:1px solid #e3e7ee}
.chart{border:1px solid #d5dae3;border-radius:6px;padding:1rem;margin:1.4rem 0}
.chart img.src{max-width:520px;max-height:380px;display:block;margin:.5rem 0}
.essays{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:.8rem}
.essay{background:#f8f9fb;border:1px solid #e3e7ee;border-radius:4px;padding:.6rem;font-size:.85rem}
.essay h4{margin:.1rem 0 .4rem 0;font-size:.9rem}.essay pre{white-space:pre-wrap;font-family:inherit;margin:0}
.modes{font-size:.75rem;color:#b23b3b}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _html_table(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(f"<tr class='{cls}'>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" for cls, cells in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _comparison_cells(c: dict[str, Any], label: str) -> list[str]:
    includes = c["ci_includes_half"]
    flag = "<span class='flag'>yes</span>" if includes else "<span class='ok'>no</span>" if includes is False else "n/a"
    return [label, str(c["n"]), f"{c['wins']} / {c['losses']} / {c['ties']} / {c['invalid']}", _pct(c["win_rate"]),
            _ci(c["ci95"]), _pct(c["length_controlled"]["win_rate"]), _pct(c["swap_consistency"]), flag]


def _section_comparisons(summary: dict[str, Any], figures: dict[str, bytes]) -> str:
    rows = []
    for c in summary["comparisons"]:
        rows.append(("", _comparison_cells(c, f"<b>{_e(c['a'])} vs {_e(c['b'])}</b>")))
        rows += [("sub", _comparison_cells(tc, _e(t))) for t, tc in c["by_type"].items()]
    table = _html_table(["comparison / chart type", "n", "wins / losses / ties / invalid", "win rate",
                         "95 % CI (Wilson)", "length-controlled", "swap consistency", "CI includes 50 %"], rows)
    sentences = "".join(f"<li>{_e(verdict_sentence(c))}</li>" for c in summary["comparisons"])
    sentences += "".join(f"<li class='note'>{_e(line)}</li>" for c in summary["comparisons"] for line in caveats(c))
    fig = (f"<img class='fig' alt='win rates per comparison and chart type' src='{data_uri(figures['win_rates.png'])}'>"
           if "win_rates.png" in figures else "<p class='note'>No comparisons were judged.</p>")
    return (f"<h2>Win rates</h2>{table}<ul>{sentences}</ul>{fig}"
            "<p class='note'>Bars: win rate of the first-named model = (wins + ties/2) / (n &minus; invalid), with the "
            "Wilson 95 % interval; diamonds: the length-controlled win rate (logistic regression on the word-count "
            "difference, at equal length). Swap consistency: share of valid pairs whose two orders agree.</p>")


def _section_quality(summary: dict[str, Any]) -> str:
    models = summary["models"]
    modes = sorted({m for q in models.values() for m in q["failure_modes"]})
    rows = [("", [_e(LABELS.get(m, m)), str(q["n"]), _num(q["mean_words"], 1), str(q["with_any_failure"]),
                  *[str(q["failure_modes"].get(x, 0)) for x in modes],
                  f"{_pct(q['numeric_faithfulness'])} (n={q['numeric_faithfulness_n']})"]) for m, q in models.items()]
    lim = summary["word_limits"]
    return ("<h2>Failure modes and faithfulness (test split)</h2>"
            + _html_table(["model", "essays", "mean words", "any failure", *modes, "numeric faithfulness"], rows)
            + f"<p class='note'>too_short &lt; {lim['min_words']} words, too_long &gt; {lim['max_words']} words; "
              "numeric faithfulness = share of the essay's numbers found in the chart's data table.</p>")


def _section_training(summary: dict[str, Any], figures: dict[str, bytes]) -> str:
    training = summary["training"]
    if not training:
        return "<h2>Training</h2><p class='note'>No finetune metrics found.</p>"
    rows = [("", [_e(v), str(t["steps"] if t["steps"] is not None else "n/a"), _num(t["final_train_loss"]),
                  _num(t["final_val_loss"]), f"{_num(t['best_val_loss'])} (step {t['best_step']})"])
            for v, t in training.items()]
    imgs = "".join(f"<img class='fig' alt='{_e(name)}' src='{data_uri(png)}'>" for name, png in figures.items()
                   if name == "loss_curves.png" or name.startswith("loss-"))
    return ("<h2>Training</h2>" + _html_table(["variant", "steps", "final train loss", "final validation loss",
                                               "best validation loss"], rows) + imgs)


def gallery_ids(summary: dict[str, Any], inputs, count: int) -> list[str]:
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


def _essay_card(model: str, text: str | None, modes: list[str], words: int | None) -> str:
    body = "<em>missing</em>" if text is None else f"<pre>{_e(text) or '<em>(empty)</em>'}</pre>"
    flags = f"<div class='modes'>{_e(', '.join(modes))}</div>" if modes else ""
    count = f" &middot; {words} words" if words is not None else ""
    return f"<div class='essay'><h4>{_e(LABELS.get(model, model))}{count}</h4>{flags}{body}</div>"


def _section_gallery(summary: dict[str, Any], inputs, ctx) -> str:
    from pipeline.essays import word_count
    from pipeline.quality import failure_modes
    from pipeline.llm import image_mime
    from pipeline.stages.report import MODEL_VARIANT, ORDERS
    from pipeline.stats import combine

    lim = summary["word_limits"]
    verdicts: dict[str, list[dict[str, Any]]] = {}
    for v in inputs.verdicts:
        verdicts.setdefault(v["chart_id"], []).append(v)
    cards = []
    for cid in gallery_ids(summary, inputs, ctx.config.report.gallery):
        chart = inputs.charts.get(cid, {})
        img = ""
        if chart.get("image") and ctx.store.exists(chart["image"]):
            mime = image_mime(chart.get("image_format"))
            img = f"<img class='src' alt='chart {_e(cid)}' src='{data_uri(ctx.store.get_bytes(chart['image']), mime)}'>"
        essays = []
        for model in inputs.models:
            text = inputs.essays[model].get(cid)
            modes = [] if text is None else failure_modes(text, variant=MODEL_VARIANT.get(model),
                                                          min_words=lim["min_words"], max_words=lim["max_words"],
                                                          table_rows=chart.get("table"))
            essays.append(_essay_card(model, text, modes, None if text is None else word_count(text)))
        rows = []
        for (a, b), recs in sorted(_by_comparison(verdicts.get(cid, [])).items()):
            by_order = {r["order"]: r for r in recs}
            cells = [f"{_e(a)} vs {_e(b)}"]
            for order in ORDERS:
                r = by_order.get(order)
                cells.append("&mdash;" if r is None else _e({"a": a, "b": b}.get(r["verdict"], "invalid")))
            outcome = combine(tuple(by_order[o]["verdict"] for o in ORDERS if o in by_order))
            cells.append(_e(outcome))
            rows.append(("", cells))
        table = _html_table(["comparison", f"{ORDERS[0]}: a shown first", f"{ORDERS[1]}: b shown first",
                             "outcome for a"], rows)
        cards.append(f"<div class='chart'><h3>{_e(cid)} &middot; {_e(chart.get('type', '?'))}</h3>"
                     f"<p><b>{_e(chart.get('title', ''))}</b></p>{img}<div class='essays'>{''.join(essays)}</div>"
                     f"{table}</div>")
    if not cards:
        return ""
    return "<h2>Gallery: test charts</h2>" + "".join(cards)


def _by_comparison(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault((r["a"], r["b"]), []).append(r)
    return out


def render_html(summary: dict[str, Any], inputs, figures: dict[str, bytes], ctx) -> str:
    j = summary["judge"]
    intro = (f"<p>Judge <code>{_e(j['model'])}</code> (template <code>{_e(j['template'])}</code>, chart image "
             f"{'attached' if j['vision'] else 'not attached'}), {j['requests']} requests, "
             f"${j['cost_usd']:.4f}; {summary['test_charts']} test charts. Every pair is judged in both orders: a "
             "verdict that flips with the order is a tie; an answer naming neither or both essays (after one retry) "
             "is invalid and excluded from the rates.</p>")
    body = (f"<h1>ielts-distill report &middot; run <code>{_e(summary['run_id'])}</code></h1>{intro}"
            + _section_comparisons(summary, figures) + _section_quality(summary)
            + _section_training(summary, figures) + _section_gallery(summary, inputs, ctx))
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>ielts-distill report: {_e(summary['run_id'])}</title><style>{CSS}</style></head>"
            f"<body>{body}</body></html>\n")
