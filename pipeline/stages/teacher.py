"""teacher: one Band-9 IELTS Task 1 essay per chart from an OpenAI-compatible LLM, checked by quality gates.

Per chart: prompt from the chart type's template (pipeline/prompts/teacher/<version>/), with the title,
the image as a base64 data URL (``teacher.vision``) and the data table as text where one exists; the
answer passes the gates (pipeline.quality.gate) or is regenerated with the failure reasons added to the
prompt, up to ``teacher.max_attempts``; then the chart's record is written under
``<run>/teacher/records/<chart_id>.json`` with status ``accepted`` or ``rejected`` (with its reason).
API errors that persist after retries also end as ``rejected`` with the error. Reruns and shards do only
the charts without a record. Once every chart has one: ``essays.jsonl`` then ``_SUCCESS``.
With ``teacher.min_test_charts`` the charts are drawn in a fixed seeded order, ``draw_batch`` at a time, until
the accepted essays the dataset can use (three steps that parse or can be inferred) give that many test
charts; only the drawn charts go into ``essays.jsonl``.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from dataclasses import replace
from typing import Any

from pipeline import artifacts
from pipeline.context import StageContext
from pipeline.essays import CANONICAL_HEADERS
from pipeline.records import Shard

# The quality gate of a chart whose table has up to this many cells runs on the event loop: 1-3 ms with an
# essay quoting 20 figures, while a thread hop adds ~0.3 ms of CPU and GIL hand-offs and the gate's CPU stays
# in this process either way. Larger tables (the sample's largest: 700-1,300 cells, tens of ms) go to a thread.
GATE_INLINE_CELLS = 100

# teacher.essay_grammar (GBNF, llama.cpp): the seed's three-step layout with the parser's canonical headers;
# the model writes only the quoted prose, which has no line breaks, quotes, markdown, brackets or emoji.
ESSAY_GRAMMAR = "\n".join([
    r'root ::= "{}\n" prose "\n\n{}\n\n" body "{}\n" prose'.format(*CANONICAL_HEADERS),
    r'body ::= "Paragraph 1:\n" prose "\n\nParagraph 2:\n" prose "\n\n" ("Paragraph 3:\n" prose "\n\n")?',
    'prose ::= "\\"" [A-Z0-9] [a-zA-Z0-9\\u00c0-\\u00ff .,;:!?\'()%$/&+=\\u2018\\u2019\\u2013\\u2014\\u00a3\\u20ac\\u00b0-]+ "\\""',
])


def build_messages(chart: dict[str, Any], template, *, image_url: str | None,
                   feedback: list[str] | None = None, data: str | None = None) -> list[dict[str, Any]]:
    """The user message for one attempt: the filled template (+ data, + last attempt's failures) and,
    when ``image_url`` is given, the image. ``data``: ``chart_data(chart)``, when the caller has it."""
    from pipeline.llm import user_message
    from pipeline.prompts import FEEDBACK, NO_IMAGE, chart_data

    data = chart_data(chart) if data is None else data
    extra = [data] if data else []
    if feedback:
        extra.append(FEEDBACK.format(reasons="; ".join(feedback)))
    image_name = "IMAGE_LAST" if image_url else NO_IMAGE
    return user_message(template.render(chart["title"], image_name, "\n\n".join(extra)), image_url)


def make_handler(ctx: StageContext):
    """The async per-chart function for pipeline.llm.runner.run_items."""
    from pipeline.llm import LLMError, image_data_url, strip_think
    from pipeline.prompts import FRAMING, chart_data, teacher_template
    from pipeline.quality import final_findings, gate_findings
    from pipeline.store import blocking

    cfg = ctx.config.teacher
    body = {"min_tokens": cfg.min_tokens} if cfg.min_tokens else {}
    if cfg.essay_grammar:
        body["grammar"] = ESSAY_GRAMMAR
    extra = {"extra_body": body} if body else {}

    @functools.cache
    def instructions(template) -> str:  # the prompt's fixed text, for the gate's echo check
        return f"{template.text}\n{FRAMING}"

    async def gate(text: str, chart: dict[str, Any], template, data: str) -> list[tuple[str, str]]:
        table, title = chart.get("table"), chart.get("title")
        args = (text, table, cfg, title, instructions(template), data)
        if table and cfg.check_numbers and sum(map(len, table)) > GATE_INLINE_CELLS:
            # the number gate of a large table (78 ms for 336 rows) runs in a thread: the event loop keeps
            # serving the other requests meanwhile
            return await asyncio.to_thread(gate_findings, *args)
        return gate_findings(*args)

    async def essay_for(chart: dict[str, Any], client) -> dict[str, Any]:
        template = teacher_template(chart["type"], cfg.templates)
        image_url = None
        if cfg.vision:
            data = await blocking(ctx.store, ctx.store.get_bytes, chart["image"])
            image_url = image_data_url(data, chart.get("image_format", "png"))
        record: dict[str, Any] = {
            "chart_id": chart["id"], "type": chart["type"], "status": "rejected", "essay": "", "attempts": 0,
            "reason": None, "reason_code": None, "failures": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "cost_usd": 0.0, "template": template.name, "template_version": template.version,
            "template_sha": template.sha, "model": cfg.model, "raw_answer": None}
        feedback: list[str] | None = None
        data = chart_data(chart)

        def hopeless(raw: str) -> list[tuple[str, str]]:  # teacher.stop_early: findings no more text can undo
            return final_findings(strip_think(raw[: raw.rfind("\n") + 1]), cfg, chart.get("title"),
                                  instructions(template), data)

        for attempt in range(1, cfg.max_attempts + 1):
            record["attempts"] = attempt
            try:
                done = await client.chat(build_messages(chart, template, image_url=image_url, feedback=feedback,
                                                        data=data), stop_when=hopeless if cfg.stop_early else None,
                                         **extra)
            except LLMError as exc:  # persisted after retries: the chart ends rejected, with the error
                record.update(reason=f"api error: {exc}", reason_code="api_error", error=str(exc))
                return record
            record["usage"]["prompt_tokens"] += done.prompt_tokens
            record["usage"]["completion_tokens"] += done.completion_tokens
            record["cost_usd"] = round(record["cost_usd"] + done.cost_usd, 8)
            record["raw_answer"] = done.raw_text
            record["finish_reason"] = done.finish_reason
            # stopped mid-answer: what stopped it (the whole gate would add that the half answer is short)
            findings = hopeless(done.raw_text) if done.finish_reason == "abandoned" else \
                await gate(done.text, chart, template, data)
            if done.truncated:  # a cut essay may still pass the gates: it is never accepted
                findings.insert(0, ("truncated", f"the answer was cut at the token limit (finish_reason 'length'); "
                                                 f"write at most {cfg.max_words} words"))
            if not findings:
                record.update(status="accepted", essay=done.text)
                return record
            feedback = [why for _, why in findings]
            record["failures"].append(feedback)
        record.update(reason="quality gate: " + "; ".join(feedback or []), reason_code=f"gate:{findings[0][0]}")
        return record

    return essay_for


def check(ctx: StageContext) -> None:
    """Everything that can fail before a chart is paid for, with one line each: ingest done, a template
    for every chart type present, the key variable set, the endpoint answering and taking the key."""
    from pipeline.llm import check_endpoint
    from pipeline.prompts import teacher_template

    ctx.require()
    for chart_type in sorted({c["type"] for c in artifacts.charts(ctx)}):
        teacher_template(chart_type, ctx.config.teacher.templates)
    check_endpoint(ctx.config.teacher, "teacher")


def run(ctx: StageContext) -> None:
    from pipeline.items import run_stage_items
    from pipeline.llm import embedded_server

    cfg = ctx.config.teacher
    charts = artifacts.charts(ctx)
    handler = make_handler(ctx)

    def request(part: list[dict[str, Any]], where: StageContext, llm) -> None:
        # grouped by chart type: consecutive prompts share the template's long prefix, which a local server
        # (llama.cpp) reuses from its KV cache instead of evaluating ~1,200 tokens again
        run_stage_items(where, llm, sorted(part, key=lambda c: c["type"]), handler, item_id=lambda c: c["id"],
                        noun="charts")

    if cfg.min_test_charts is None:
        request(charts, ctx, cfg)
        drawn = {c["id"] for c in charts}
    else:
        # Every shard works on each batch, split by the records' claims (one payer per chart), and waits for
        # the batch's last record: so all of them see the same count and stop at the same batch. Each keeps
        # its share of the budget and of the rate limit.
        n = ctx.shard.count
        share = cfg.model_copy(update={"budget_usd": cfg.budget_usd / n if cfg.budget_usd else None,
                                       "requests_per_minute": cfg.requests_per_minute / n
                                       if cfg.requests_per_minute else None})
        whole = replace(ctx, shard=Shard())
        order = draw_order(charts, ctx.config.dataset.seed)
        if enough(ctx, order) is None:
            # one embedded server for all batches: it keeps the few-shot prefix of the last type in its cache
            with embedded_server(share) as live:
                for start in range(0, len(order), cfg.draw_batch):
                    if enough(ctx, order[:start]) is not None:
                        break
                    request(order[start:start + cfg.draw_batch], whole, live)
        drawn = {c["id"] for c in order[:enough(ctx, order) or len(order)]}
    ids = [c["id"] for c in charts if c["id"] in drawn]  # ingest order, kept in essays.jsonl
    ctx.collect_if_complete(artifacts.TEACHER_ESSAYS, [(ctx.records(), ids)], lambda rows: summarize(ctx, rows, len(charts)))


def draw_order(charts: list[dict[str, Any]], seed: str) -> list[dict[str, Any]]:
    """The fixed order the teacher draws charts in (``teacher.min_test_charts``): a stable hash of the id."""
    from pipeline.records import stable_hash

    return sorted(charts, key=lambda c: (stable_hash(c["id"], f"{seed}|teacher-draw"), c["id"]))


def enough(ctx: StageContext, order: list[dict[str, Any]]) -> int | None:
    """The fewest charts of ``order`` (a prefix, in whole draw batches) whose records all exist and whose
    accepted essays the dataset can use (``usable_essays``) give ``teacher.min_test_charts`` test charts;
    None when no prefix does (yet)."""
    cfg, split = ctx.config.teacher, ctx.config.dataset
    records = ctx.records()
    done = records.done_ids()
    accepted = 0
    for start in range(0, len(order), cfg.draw_batch):
        batch = [c["id"] for c in order[start:start + cfg.draw_batch]]
        if any(i not in done for i in batch):
            return None
        accepted += usable_essays(ctx, records.read_all(batch))
        if artifacts.split_sizes(accepted, split.train, split.test)["test"] >= (cfg.min_test_charts or 0):
            return start + len(batch)
    return None


def usable_essays(ctx: StageContext, rows: list[dict[str, Any]]) -> int:
    """Accepted essays the dataset stage will keep: three steps that parse or can be inferred."""
    from pipeline.essays import usable

    infer = ctx.config.dataset.infer_structure
    return sum(r.get("status") == "accepted" and usable(r.get("essay") or "", infer) for r in rows)


def summarize(ctx: StageContext, rows: list[dict[str, Any]], total: int) -> dict[str, Any]:
    """The teacher's summary once every chart has a record (essays.jsonl is in chart order); ``total``: the
    charts ingest accepted."""
    status = Counter(r["status"] for r in rows)
    summary = {
        "charts": len(rows), "charts_available": total,
        "accepted": status.get("accepted", 0), "rejected": status.get("rejected", 0),
        "rejected_by_reason": dict(Counter(r.get("reason_code") or "other" for r in rows if r["status"] != "accepted")),
        "attempts": sum(r.get("attempts", 0) for r in rows),
        "prompt_tokens": sum(r.get("usage", {}).get("prompt_tokens", 0) for r in rows),
        "completion_tokens": sum(r.get("usage", {}).get("completion_tokens", 0) for r in rows),
        "cost_usd": round(sum(r.get("cost_usd", 0.0) for r in rows), 6),
        "model": ctx.config.teacher.model, "templates": ctx.config.teacher.templates,
    }
    ctx.log.info("teacher: complete: %d charts, %d accepted, %d rejected (%s), $%.4f", summary["charts"],
                 summary["accepted"], summary["rejected"],
                 ", ".join(f"{k} {v}" for k, v in summary["rejected_by_reason"].items()) or "none", summary["cost_usd"])
    cfg, split = ctx.config.teacher, ctx.config.dataset
    if cfg.min_test_charts is not None:
        summary["usable"] = usable = usable_essays(ctx, rows)
        test = artifacts.split_sizes(usable, split.train, split.test)["test"]
        summary["test_charts"] = test
        ctx.log.info("teacher: drew %d of %d charts (in batches of %d) for %d accepted essays, %d with three steps "
                     "the dataset can read: %d test charts (teacher.min_test_charts %d)%s", len(rows), total,
                     cfg.draw_batch, summary["accepted"], usable, test, cfg.min_test_charts,
                     "" if test >= cfg.min_test_charts else
                     f"; every chart drawn and still short: raise data.limit (the cap, {total} charts now)")
    return summary


def progress(ctx: StageContext) -> tuple[int, int | None]:
    done = ctx.records().count()
    key = ctx.input_key("ingest", artifacts.CHARTS)
    total = len(ctx.store.get_jsonl(key)) if ctx.store.exists(key) else None
    return done, total


def started(ctx: StageContext) -> bool:
    """``progress(ctx)[0] > 0`` without listing every record (``ielts-distill runs``)."""
    return ctx.records().started()
