"""judge: pairwise LLM-as-judge of the generated essays on the test split, in both orders.

For each comparison ``(a, b)`` in ``judge.comparisons`` and each test chart, the judge sees the seed's
evaluation prompt (``pipeline/prompts/judge_<template>.txt``: the chart's title and the teacher's essay as
the golden standard, then ``<FIRST>`` and ``<SECOND>``), with the chart image attached when the judge has
vision. Order ``ab`` shows a's essay first, ``ba`` shows b's first, so position bias shows up as a flip
(counted as a tie by :mod:`pipeline.stats`). View ``neutral`` (the headline) shows the golden essay and both
candidates in one layout (``judge.golden_form``, :func:`pipeline.essays.pair_form`), so layout cannot decide
a verdict; view ``as_written`` (``judge.as_written``) shows the candidates as their models wrote them. An
answer naming neither or both tags is asked once more with a reminder; if it still names neither or both, the
verdict is ``invalid`` and the raw text is kept.

Records: ``<run>/judge/records/<a>-vs-<b>/<chart_id>/<ab|ba>.json`` (as written: ``as-written-<ab|ba>.json``)
= ``{comparison, a, b, chart_id, order, view, verdict: a|b|invalid, raw_answer, attempts, usage, cost_usd}``,
written as each answer arrives (resume, shards, budget: :func:`pipeline.llm.runner.run_items`). When every
record exists: ``verdicts.jsonl``, ``_SUCCESS``.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from typing import Any

from pipeline import artifacts
from pipeline.artifacts import ORDERS
from pipeline.context import StageContext
from pipeline.errors import ArtifactNotFound, StageError

NEUTRAL, AS_WRITTEN = artifacts.VIEWS
REMINDER = "Answer with exactly one word: <FIRST> or <SECOND>."
_TAG = re.compile(r"<\s*(FIRST|SECOND)\s*>", re.I)
_WORD = re.compile(r"\b(FIRST|SECOND)\b", re.I)


@dataclass(frozen=True)
class Item:
    """One judge request: a comparison, a chart, an order."""

    a: str
    b: str
    chart_id: str
    order: str
    view: str = NEUTRAL

    @property
    def comparison(self) -> str:
        return f"{self.a}-vs-{self.b}"

    @property
    def id(self) -> str:
        return f"{self.comparison}/{self.chart_id}/{'as-written-' if self.view == AS_WRITTEN else ''}{self.order}"

    @property
    def first_second(self) -> tuple[str, str]:
        return (self.a, self.b) if self.order == "ab" else (self.b, self.a)


# --------------------------------------------------------------------------- the prompt and the answer


def load_template(name: str) -> str:
    from pipeline.prompts import read_prompt

    if not (resources.files("pipeline.prompts") / f"judge_{name}.txt").is_file():
        known = sorted(p.name[6:-4] for p in resources.files("pipeline.prompts").iterdir()
                       if p.name.startswith("judge_") and p.name.endswith(".txt"))
        raise StageError(f"judge.template {name!r}: no pipeline/prompts/judge_{name}.txt (known: {', '.join(known)})")
    return read_prompt(f"judge_{name}.txt")


def build_prompt(template: str, title: str, golden: str, first: str, second: str) -> str:
    return template.format(golden_title=title, golden_essay=golden, first_essay=first, second_essay=second)


def parse_choice(text: str) -> str | None:
    """``first`` / ``second`` when the answer names exactly one of them, else None.

    Tags (``<FIRST>``) decide when present; otherwise the bare words do (``First.``, ``SECOND``)."""
    found = {m.upper() for m in _TAG.findall(text or "")} or {m.upper() for m in _WORD.findall(text or "")}
    return found.pop().lower() if len(found) == 1 else None


def messages_for(prompt: str, image: bytes | None, image_format: str = "png") -> list[dict[str, Any]]:
    from pipeline.llm import image_data_url, user_message

    return user_message(prompt, None if image is None else image_data_url(image, image_format))


GRAMMAR = 'root ::= "<FIRST>" | "<SECOND>"'  # GBNF (llama.cpp) for judge.answer_grammar


async def judge_one(client, item: Item, messages: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """Ask, parse, ask once more with a reminder if the answer names neither or both; the record.
    ``overrides`` go to every ``client.chat`` call (e.g. the grammar's ``extra_body``)."""
    from pipeline.llm import ask_parsed

    answer = await ask_parsed(client, messages, parse_choice, REMINDER, **overrides)
    choice, raw, attempts, reason = answer.parsed, answer.raw, answer.attempts, answer.reason
    usage, cost = answer.usage, answer.cost_usd
    first, second = item.first_second
    picked = {"first": first, "second": second}.get(choice or "")
    verdict = "invalid" if picked is None else ("a" if picked == item.a else "b")
    if verdict == "invalid" and reason is None:
        reason = "answer names neither or both of <FIRST> and <SECOND>"
    return {"comparison": item.comparison, "a": item.a, "b": item.b, "chart_id": item.chart_id,
            "order": item.order, "view": item.view, "verdict": verdict, "raw_answer": raw, "attempts": attempts,
            "usage": usage, "cost_usd": round(cost, 8),
            **({"reason": reason} if verdict == "invalid" else {})}


# --------------------------------------------------------------------------- planning


@dataclass
class Plan:
    items: list[Item]
    charts: dict[str, dict[str, Any]]
    golden: dict[str, str]
    essays: dict[str, dict[str, str]]  # model -> chart_id -> essay (self-test: already in the pair's form)


def make_plan(ctx: StageContext) -> Plan:
    ctx.require()
    charts = artifacts.charts_by_id(ctx)
    golden = artifacts.golden_essays(ctx)
    essays: dict[str, dict[str, str]] = {}
    for r in artifacts.generated_essays(ctx):
        essays.setdefault(r["model"], {})[r["chart_id"]] = r.get("essay") or ""
    try:
        test = artifacts.split_ids(ctx, "test")
    except ArtifactNotFound:
        raise StageError(f"judge needs {ctx.store.url(ctx.input_key('dataset', artifacts.SPLITS))}") from None
    cfg = ctx.config.judge
    items: list[Any] = []
    rubric: dict[str, list[str]] = {}  # model -> charts to score on the rubric (judge.rubric)
    for a, b, _ in ctx.config.judged_comparisons():  # judge.comparisons, per seed with finetune.seeds
        for model in (a, b):
            if model not in essays:
                raise StageError(f"judge.comparisons names '{model}' but generate has no essays for it "
                                 f"(models: {', '.join(sorted(essays)) or 'none'})")
        ids = [cid for cid in test if cid in essays[a] and cid in essays[b] and cid in golden and cid in charts]
        views = (NEUTRAL, AS_WRITTEN) if cfg.as_written else (NEUTRAL,)
        for cid in ids[: cfg.limit] if cfg.limit else ids:
            items += [Item(a, b, cid, order, view) for view in views for order in ORDERS]
            for model in (a, b):
                rubric.setdefault(model, []).append(cid)
    items += selftest_items(cfg.selftest_charts, test, golden, charts, essays, cfg.golden_form)
    if cfg.rubric:
        from pipeline.rubric import RubricItem

        items += sorted({RubricItem(m, cid) for m, ids in rubric.items() for cid in ids}, key=lambda i: i.id)
    return Plan(items, charts, golden, essays)


def selftest_items(count: int, test: list[str], golden: dict[str, str], charts: dict[str, Any],
                   essays: dict[str, dict[str, str]], golden_form: str = "prose") -> list[Item]:
    """The judge's self-test (:mod:`pipeline.selftest`): on ``count`` test charts with a human-written summary
    (by stable hash), that summary in the pair's form against a copy of it made worse in one known way, judged
    in both orders like every pair, the teacher's essay as the reference (a corruption that leaves a chart's
    summary unchanged, e.g. no figures to move, skips that chart). Adds the texts to ``essays``."""
    import random

    from pipeline.essays import pair_form
    from pipeline.records import stable_hash
    from pipeline.selftest import PLANTED, good_essay, planted

    form = pair_form(golden_form, (artifacts.SELFTEST_GOLDEN,))
    ids = sorted((c for c in test if c in golden and (charts.get(c) or {}).get("summary")),
                 key=lambda c: stable_hash(c, "selftest"))[:count]
    good = {cid: good_essay(charts[cid]["summary"], form) for cid in ids}
    items = []
    for kind in PLANTED:
        model = artifacts.SELFTEST_PREFIX + kind
        worse = {cid: planted(good[cid], kind, random.Random(f"{cid}/{kind}")) for cid in ids}
        essays[model] = {cid: text for cid, text in worse.items() if text != good[cid]}
        items += [Item(artifacts.SELFTEST_GOLDEN, model, cid, order) for cid in essays[model] for order in ORDERS]
    if ids:
        essays[artifacts.SELFTEST_GOLDEN] = good
    return items


def inputs_fingerprint(ctx: StageContext, plan: Plan) -> str:
    """What a verdict depends on: the golden and generated essays, the judge model and how it is asked.
    (Not comparisons or limit: they only add or drop items.)"""
    from pipeline.records import fingerprint

    judge, llm = ctx.config.judge, ctx.config.judge_llm()
    return fingerprint("layout-neutral", plan.golden, plan.essays, judge.template, judge.golden_form,
                       judge.answer_grammar, llm.model,
                       llm.vision, llm.temperature, llm.max_tokens, judge.rubric and judge.rubric_template)


def progress(ctx: StageContext) -> tuple[int, int | None]:
    done = ctx.records().count()
    try:
        return done, len(make_plan(ctx).items)
    except Exception:  # upstream not ready: the count alone
        return done, None


def started(ctx: StageContext) -> bool:
    """``progress(ctx)[0] > 0`` without listing every record (``ielts-distill runs``)."""
    return ctx.records().started()


# --------------------------------------------------------------------------- the stage


def check(ctx: StageContext) -> Plan:
    """Everything that can fail before a verdict is paid for or set aside: upstream outputs, something to
    judge, the template, the key variable, the endpoint answering and taking the key. Returns the plan."""
    from pipeline.llm import check_endpoint

    plan = make_plan(ctx)
    if not plan.items:
        raise StageError("judge: nothing to judge (no test chart has a golden essay and both models' essays)")
    load_template(ctx.config.judge.template)
    if ctx.config.judge.rubric:
        load_template(ctx.config.judge.rubric_template)
    check_endpoint(ctx.config.judge_llm(), "judge")
    return plan


def run(ctx: StageContext) -> None:
    from pipeline import rubric
    from pipeline.items import run_stage_items
    from pipeline.rubric import RubricItem

    plan = check(ctx)  # before any verdict is moved aside
    llm_cfg = ctx.config.judge_llm()
    template = load_template(ctx.config.judge.template)
    rubric_template = load_template(ctx.config.judge.rubric_template) if ctx.config.judge.rubric else ""
    kinds = Counter("rubric" if isinstance(i, RubricItem) else "self-test" if i.a == artifacts.SELFTEST_GOLDEN
                    else "pairs as written" if i.view == AS_WRITTEN else "layout-neutral pairs" for i in plan.items)
    ctx.log.info("judge: %d requests planned (%s), shard %s; judge %s%s", len(plan.items),
                 ", ".join(f"{n} {k}" for k, n in kinds.items()), ctx.shard, llm_cfg.model,
                 " with the chart image" if llm_cfg.vision else "")
    overrides = {"extra_body": {"grammar": GRAMMAR}} if ctx.config.judge.answer_grammar else {}
    image_of = functools.lru_cache(maxsize=256)(lambda key: ctx.store.get_bytes(key))

    async def handle(item: Item | RubricItem, client) -> dict[str, Any]:
        chart = plan.charts[item.chart_id]
        image = await asyncio.to_thread(image_of, chart["image"]) if llm_cfg.vision else None
        if isinstance(item, RubricItem):  # judge.rubric: one essay's IELTS bands
            prompt = rubric.build_prompt(rubric_template, chart["title"], chart.get("table"),
                                         plan.essays[item.model][item.chart_id])
            return await rubric.score_one(client, item, messages_for(prompt, image, chart.get("image_format", "png")))
        golden, first, second = shown_texts(item, plan, ctx.config.judge.golden_form)
        prompt = build_prompt(template, chart["title"], golden, first, second)
        return await judge_one(client, item, messages_for(prompt, image, chart.get("image_format", "png")),
                               **overrides)

    run_stage_items(ctx, llm_cfg, plan.items, handle, item_id=lambda i: i.id, noun="requests",
                    inputs=inputs_fingerprint(ctx, plan), outcome=lambda r: r["verdict"],
                    reason=lambda r: r.get("reason"))
    finish(ctx, plan)


def shown_texts(item: Item, plan: Plan, golden_form: str) -> tuple[str, str, str]:
    """(golden, first, second) as the judge sees them. Neutral: all three in the pair's one form (the
    self-test's texts are planted in it already); as written: the golden essay in ``golden_form``, the
    candidates untouched."""
    from pipeline.essays import golden_view, in_form, pair_form

    first, second = (plan.essays[m][item.chart_id] for m in item.first_second)
    golden = plan.golden[item.chart_id]
    if item.view == AS_WRITTEN:
        return golden_view(golden, golden_form, (item.a, item.b)), first, second
    form = pair_form(golden_form, (item.a, item.b))
    if item.a == artifacts.SELFTEST_GOLDEN:
        return in_form(golden, form), first, second
    return in_form(golden, form), in_form(first, form), in_form(second, form)


def finish(ctx: StageContext, plan: Plan) -> None:
    """Write verdicts.jsonl and _SUCCESS once every shard's records exist."""
    def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
        counts = Counter(r["verdict"] for r in rows)
        return {"requests": len(rows), "invalid": counts.get("invalid", 0),
                "retried": sum(1 for r in rows if r.get("attempts", 1) > 1),
                "cost_usd": round(sum(float(r.get("cost_usd") or 0) for r in rows), 6)}

    ctx.collect_if_complete(artifacts.VERDICTS, [(ctx.records(), [i.id for i in plan.items])], summarize)
