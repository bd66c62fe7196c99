"""The judge stage against a real OpenAI-compatible HTTP server on loopback (tests/fake_llm.py), scripted to
answer like a fair judge, a position-biased one, and one that answers garbage or names both essays."""

from __future__ import annotations

import base64
from collections import Counter

import pytest
from eval_helpers import seed_run, split_charts
from fake_llm import FakeLLM

from pipeline.context import StageContext, store_for
from pipeline.errors import StageError
from pipeline.essays import golden_view
from pipeline.executors.local import run_stage
from pipeline.llm import LLMClient
from pipeline.records import Shard
from pipeline.stages import judge
from pipeline.stats import Pair, summarize

COMPARISONS = ("structured-vs-baseline", "unstructured-vs-baseline", "unstructured-vs-structured")
RANK = {"baseline": 1, "structured": 2, "unstructured": 3}
TITLE_KEY = r"ought to compare to:\n\s*(.*?)\n"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(LLMClient, "BACKOFF_INITIAL", 0.01)
    monkeypatch.setattr(LLMClient, "BACKOFF_MAX", 0.05)


def first_text(request: dict) -> str:
    content = request["messages"][0]["content"]
    return content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")


def shown(request: dict) -> tuple[str, str]:
    """The (first, second) essays of a judge request."""
    _, _, rest = first_text(request).partition("\n    <FIRST>\n    ")
    first, _, second = rest.partition("\n\n    <SECOND>\n    ")
    return first.strip(), second.strip()


def model_of(essay: str) -> str:  # the helper's essays are recognisable in any layout (eval_helpers.model_essay)
    return "unstructured" if "12345" in essay else "structured" if "The chart illustrates" in essay else "baseline"


def fair(request: dict, key: str) -> str:
    first, second = shown(request)
    return "<FIRST>" if RANK[model_of(first)] > RANK[model_of(second)] else "<SECOND>"


def setup_run(store_uri, sample_dir, tmp_path, llm: FakeLLM, *extra: str):
    config = seed_run(store_uri, sample_dir, tmp_path, overrides=(
        f"judge.base_url={llm.base_url}", "judge.model=fake-judge", "judge.timeout_s=2", "judge.max_retries=1",
        "judge.selftest_charts=0", "judge.as_written=false", *extra))  # self-test: tests/test_selftest.py
    return config, store_for(config)


def verdicts(store, config) -> list[dict]:
    return store.get_jsonl(f"{config.run.id}/judge/verdicts.jsonl")


def test_fair_judge_both_orders_with_image(store_uri, sample_dir, tmp_path):
    with FakeLLM(reply=fair, key_pattern=TITLE_KEY) as llm:
        config, store = setup_run(store_uri, sample_dir, tmp_path, llm, "judge.vision=true")
        assert run_stage(config, store, "judge")
    assert not any("grammar" in r for r in llm.requests)  # only when asked for
    charts = {c["id"]: c for c in split_charts(store, config)}
    rows = verdicts(store, config)
    assert len(rows) == len(llm.requests) == 3 * len(charts) * 2  # one request per (comparison, chart, order)
    assert {(r["comparison"], r["chart_id"], r["order"]) for r in rows} == \
        {(c, cid, o) for c in COMPARISONS for cid in charts for o in ("ab", "ba")}
    assert all(r["verdict"] == "a" and r["attempts"] == 1 for r in rows)  # a is better in every comparison
    # both orders really sent: each pair of essays was shown once each way round
    shown_pairs = Counter(shown(r) for r in llm.requests)
    assert all(shown_pairs[(s, f)] == 1 for f, s in shown_pairs)
    golden = {r["chart_id"]: r["essay"] for r in store.get_jsonl(f"{config.run.id}/teacher/essays.jsonl")}
    for request in llm.requests:
        text = first_text(request)
        assert text.startswith("Decide which plot description resembles the one below more")
        title = next(t for t in (c["title"] for c in charts.values()) if f"\n    {t}\n" in text)
        cid = next(i for i, c in charts.items() if c["title"] == title)
        assert golden_view(golden[cid], "prose") in text  # judge.golden_form: prose by default
        assert "<Describe a graph>" not in text.split("<FIRST>")[0]
        image = next(p for p in request["messages"][0]["content"] if p["type"] == "image_url")["image_url"]["url"]
        assert base64.b64decode(image.split(",", 1)[1]) == store.get_bytes(charts[cid]["image"])
    from pipeline.records import RecordSet

    record = RecordSet(store, f"{config.run.id}/judge/records").read(f"structured-vs-baseline/{next(iter(charts))}/ba")
    assert set(record) >= {"comparison", "a", "b", "chart_id", "order", "verdict", "raw_answer", "attempts", "usage",
                           "cost_usd"}
    assert (record["raw_answer"], record["verdict"]) == ("<SECOND>", "a")  # ba: a's essay was shown second


def test_position_biased_judge_gives_ties(tmp_path, sample_dir):
    with FakeLLM(reply=lambda request, key: "<FIRST>", key_pattern=TITLE_KEY) as llm:
        config, store = setup_run(str(tmp_path / "store"), sample_dir, tmp_path, llm, "judge.vision=false",
                                  "judge.answer_grammar=true")
        assert run_stage(config, store, "judge")
    assert all(isinstance(r["messages"][0]["content"], str) for r in llm.requests)  # no image without vision
    assert all(r["grammar"] == judge.GRAMMAR for r in llm.requests)  # llama.cpp's constrained answer
    rows = verdicts(store, config)
    assert {(r["order"], r["verdict"]) for r in rows} == {("ab", "a"), ("ba", "b")}
    by_pair: dict[tuple, list[str]] = {}
    for r in sorted(rows, key=lambda r: r["order"]):
        by_pair.setdefault((r["comparison"], r["chart_id"]), []).append(r["verdict"])
    s = summarize(Pair(cid, "bar", tuple(v)) for (_, cid), v in by_pair.items())
    assert s["ties"] == s["n"] == len(by_pair) and s["win_rate"] == 0.5 and s["swap_consistency"] == 0.0


def test_garbage_and_both_are_retried_once_then_invalid(tmp_path, sample_dir):
    charts = None

    def reply(request: dict, key: str) -> str:
        title = next(c["title"] for c in charts if f"\n    {c['title']}\n" in first_text(request))
        retry = len(request["messages"]) > 1
        assert not retry or request["messages"][-1]["content"] == judge.REMINDER
        if title == charts[0]["title"]:
            return "I think both are fine."  # neither, twice: invalid
        if title == charts[1]["title"]:
            return "<SECOND>" if retry else "Hmm, hard to say."  # valid after the retry
        if title == charts[2]["title"]:
            return "first" if retry else "<FIRST> is better than <SECOND>"  # both named, then one
        return "<FIRST>"

    with FakeLLM(reply=reply, key_pattern=TITLE_KEY) as llm:
        config, store = setup_run(str(tmp_path / "store"), sample_dir, tmp_path, llm)
        charts = split_charts(store, config)
        llm.rule = lambda key, attempt: "400" if key == charts[3]["title"] else None  # a request that fails for good
        assert run_stage(config, store, "judge")
    rows = verdicts(store, config)
    by_chart = {cid: [r for r in rows if r["chart_id"] == cid] for cid in (c["id"] for c in charts)}
    nope = by_chart[charts[0]["id"]]
    assert all(r["verdict"] == "invalid" and r["attempts"] == 2 and r["raw_answer"] == "I think both are fine."
               and "neither or both" in r["reason"] for r in nope)
    assert all(r["attempts"] == 2 and r["verdict"] == ("a" if r["order"] == "ba" else "b")
               for r in by_chart[charts[1]["id"]])
    assert all(r["attempts"] == 2 and r["verdict"] == ("a" if r["order"] == "ab" else "b")
               for r in by_chart[charts[2]["id"]])
    failed = by_chart[charts[3]["id"]]
    assert all(r["verdict"] == "invalid" and r["reason"].startswith("request failed: HTTP 400") for r in failed)
    done = StageContext(config, store, "judge").summary_of("judge")
    assert done["invalid"] == len(nope) + len(failed) and done["retried"] == 3 * 2 * 3
    assert len(llm.requests) == len(rows) + done["retried"]  # one request per item, plus one per retry


def test_resume_shards_budget_and_force(tmp_path, sample_dir):
    with FakeLLM(reply=fair, key_pattern=TITLE_KEY) as llm:
        config, store = setup_run(str(tmp_path / "store"), sample_dir, tmp_path, llm, "judge.concurrency=2",
                                  "judge.price_input_per_mtok=1000", "judge.budget_usd=0.6")
        ctx = StageContext(config, store, "judge")
        total = judge.progress(ctx)[1]
        with pytest.raises(StageError, match="budget reached"):
            run_stage(config, store, "judge", shard=Shard(0, 2))
        partial = judge.progress(ctx)[0]
        assert 0 < partial < total and not ctx.is_complete()
        nobudget = config.model_copy(update={"judge": config.judge.model_copy(update={"budget_usd": None})})
        assert run_stage(nobudget, store, "judge", shard=Shard(0, 2)) is False  # shard 1 still missing
        assert not ctx.is_complete()
        assert run_stage(nobudget, store, "judge", shard=Shard(1, 2)) is True
        assert judge.progress(ctx) == (total, total)
        assert len(llm.requests) == total  # nothing was ever asked twice
        assert len({(shown(r), first_text(r)) for r in llm.requests}) == total
        assert run_stage(nobudget, store, "judge", force=True)  # records kept: no request at all
        assert len(llm.requests) == total and len(verdicts(store, config)) == total


def test_unknown_model_in_comparisons_is_one_line(tmp_path, sample_dir):
    with FakeLLM(reply=fair) as llm:
        config, store = setup_run(str(tmp_path / "store"), sample_dir, tmp_path, llm,
                                  "judge.comparisons=[[structured, teacher-v2]]")
        with pytest.raises(StageError, match="names 'teacher-v2' but generate has no essays for it"):
            run_stage(config, store, "judge")
    assert llm.total == 0


@pytest.mark.parametrize("answer, choice", [
    ("<FIRST>", "first"), ("<SECOND>", "second"), ("< second >", "second"), ("SECOND.", "second"),
    ("The first essay is better.", "first"), ("<FIRST> (the first one is better)", "first"),  # tags decide
    ("<FIRST> is better than <SECOND>", None), ("First or second? Hard to say", None), ("", None),
    ("Neither.", None), ("firstly", None)])
def test_parse_choice(answer, choice):
    assert judge.parse_choice(answer) == choice


def test_prompt_is_the_seed_prompt_verbatim(seed_text):
    template = judge.load_template("seed_v1")
    assert seed_text[seed_text.index("### Evaluation prompt:"):].split('"""')[1] == template
    prompt = judge.build_prompt(template, "T {x}", "G", "F", "S")
    assert "    T {x}\n    G\n\n    <FIRST>\n    F\n\n    <SECOND>\n    S\n" in prompt
    with pytest.raises(StageError, match="no pipeline/prompts/judge_v9.txt"):
        judge.load_template("v9")


def test_changed_essays_make_old_verdicts_stale(tmp_path, sample_dir):
    """Verdicts are about particular essays: after generate wrote new ones, a forced judge rerun asks again
    for every pair, while an unchanged rerun asks nothing."""
    with FakeLLM(reply=fair, key_pattern=TITLE_KEY) as llm:
        config, store = setup_run(str(tmp_path / "store"), sample_dir, tmp_path, llm)
        assert run_stage(config, store, "judge")
        total = len(llm.requests)
        assert run_stage(config, store, "judge", force=True) and len(llm.requests) == total
        key = f"{config.run.id}/generate/essays.jsonl"
        rows = store.get_jsonl(key)
        store.put_jsonl(key, [{**r, "essay": r["essay"] + " Revised."} for r in rows])
        assert run_stage(config, store, "judge", force=True)
        assert len(llm.requests) == 2 * total  # every pair judged again, on the new essays
        assert all(first_text(r).count("Revised.") == 2 for r in llm.requests[total:])
        assert len(verdicts(store, config)) == total


# --------------------------------------------------------------------------- layout-neutral judging


def golden_shown(request: dict) -> str:
    """The golden essay of a judge request (between the title line and <FIRST>)."""
    head = first_text(request).split("\n\n    <FIRST>")[0]
    return head.split("ought to compare to:\n", 1)[1].split("\n", 1)[1]


def closer_to_reference(request: dict, key: str) -> str:
    """Position-unbiased: the text with the higher chrF++ to the golden essay shown (identical texts: FIRST,
    which the two orders turn into a tie)."""
    from sacrebleu.metrics import CHRF

    first, second = shown(request)
    golden = golden_shown(request)
    score = [CHRF(word_order=2).sentence_score(t, [golden]).score for t in (first, second)]
    return "<FIRST>" if score[0] >= score[1] else "<SECOND>"


@pytest.mark.parametrize("form, as_written_winner", [("prose", "unstructured"), ("structured", "structured")])
def test_layout_neutral_judging_ties_the_same_essays_in_two_layouts(tmp_path, sample_dir, form, as_written_winner):
    """The same essays, one model writing them with the step markers and the other as prose: shown as written,
    a judge that prefers the text closer to the reference decides by layout (the golden essay's); shown in one
    layout, every pair is a tie."""
    from eval_helpers import golden_essay

    from pipeline.essays import prose_form, structured_form

    with FakeLLM(reply=closer_to_reference, key_pattern=TITLE_KEY) as llm:
        config, store = setup_run(str(tmp_path / "store"), sample_dir, tmp_path, llm, f"judge.golden_form={form}",
                                  "judge.as_written=true", "judge.comparisons=[[unstructured, structured]]")
        charts = {c["id"]: c for c in store.get_jsonl(f"{config.run.id}/ingest/charts.jsonl")}
        key = f"{config.run.id}/generate/essays.jsonl"
        same = {cid: golden_essay(c).replace("clear", "visible") for cid, c in charts.items()}  # not the reference
        store.put_jsonl(key, [{**r, "essay": (structured_form if r["model"] == "structured" else prose_form)(
            same[r["chart_id"]])} for r in store.get_jsonl(key) if r["model"] != "baseline"])
        assert run_stage(config, store, "judge") and run_stage(config, store, "report")
    rows = verdicts(store, config)
    assert Counter(r["view"] for r in rows) == {"neutral": 14, "as_written": 14}
    neutral = [r for r in llm.requests if len(set(shown(r))) == 1]  # both candidates shown as the same text
    assert len(neutral) == 14 and all(("<Describe a graph>" in golden_shown(r)) == (form == "structured")
                                      for r in neutral)
    summary = store.get_json(f"{config.run.id}/report/summary.json")
    (headline,), (written,) = summary["comparisons"], summary["comparisons_as_written"]
    assert (headline["view"], written["view"]) == ("layout-neutral", "as written")
    assert headline["ties"] == headline["n"] == 7 and headline["win_rate"] == 0.5 and headline["ci_includes_half"]
    assert written["ci_includes_half"] is False and written["swap_consistency"] == 1.0
    assert (written["wins"], written["losses"]) == ((7, 0) if as_written_winner == "unstructured" else (0, 7))
    md = store.get_text(f"{config.run.id}/report/report.md")
    assert md.index("**unstructured vs structured** (layout-neutral)") < md.index(
        "**unstructured vs structured** (as written)")
    assert "**as written** (second table)" in md and "not also judged" not in md


def test_golden_view_forms():
    from eval_helpers import golden_essay

    text = golden_essay({"title": "Sales by year", "table": [["Year", "Sales"], ["2019", "12.5"]]})
    prose = golden_view(text, "prose")
    assert "<Describe a graph>" not in prose and "Paragraph 1" not in prose and '"' not in prose
    assert prose.startswith("The chart illustrates sales by year.") and prose.count("\n\n") == 3
    assert golden_view(text, "structured") == text
    assert golden_view(text, "variant", ("structured", "baseline")) == text  # the structured student's layout
    assert golden_view(text, "variant", ("unstructured", "structured")) == prose  # mixed: neutral prose
    assert golden_view(text, "variant", ("unstructured", "baseline")) == prose
    with pytest.raises(ValueError, match="unknown golden form 'bold'"):
        golden_view(text, "bold")


# --------------------------------------------------------------------------- the IELTS rubric (judge.rubric)

BANDS = {"baseline": 3, "structured": 6, "unstructured": 7}  # the same ranking as RANK


def examiner(request: dict, key: str) -> str:
    """Bands for a rubric request (by which model wrote the essay), else a fair pairwise verdict."""
    text = first_text(request)
    if "experienced IELTS examiner" not in text:
        return fair(request, key)
    band = BANDS[model_of(text.split('"""\n', 1)[1].rsplit('\n"""', 1)[0])]
    return f'{{"TA": {band}, "CC": {band}, "LR": {band + 1}, "GRA": {band - 1}}}'


def test_rubric_scores_each_judged_essay(tmp_path, sample_dir):
    with FakeLLM(reply=examiner, key_pattern=TITLE_KEY) as llm:
        config, store = setup_run(str(tmp_path / "store"), sample_dir, tmp_path, llm, "judge.rubric=true")
        assert run_stage(config, store, "judge") and run_stage(config, store, "report")
    charts = split_charts(store, config)
    rows = verdicts(store, config)
    scored = [r for r in rows if r["order"] == "rubric"]
    assert len(scored) == 3 * len(charts) and len(rows) == len(llm.requests) == 3 * len(charts) * 3
    assert all(r["verdict"] == "scored" and set(r["bands"]) == {"TA", "CC", "LR", "GRA"} for r in scored)
    with_table = next(c for c in charts if c["table"])
    prompt = next(first_text(r) for r in llm.requests if "experienced IELTS examiner" in first_text(r)
                  and with_table["title"] in first_text(r))
    assert " | ".join(with_table["table"][1]) in prompt  # the data table is in the rubric prompt
    rubric = store.get_json(f"{config.run.id}/report/summary.json")["rubric"]
    assert list(rubric["models"]) == ["baseline", "structured", "unstructured"]
    s = rubric["models"]["structured"]
    assert (s["scored"], s["invalid"], s["TA"]["mean"], s["LR"]["mean"], s["overall"]["mean"]) == (7, 0, 6, 7, 6)
    assert s["overall"]["ci95"] is not None
    assert all(a["rate"] == 1.0 and a["n"] == len(charts) for a in rubric["agreement_with_pairwise"])
    md = store.get_text(f"{config.run.id}/report/report.md")
    assert "## IELTS rubric (judge)" in md and "| fine-tuned structured | 7 (0) | 6.00 | 6.00 | 7.00 | 5.00 |" in md


@pytest.mark.parametrize("answer, bands", [
    ('{"TA": 6, "CC": 7, "LR": 6, "GRA": 5}', {"TA": 6, "CC": 7, "LR": 6, "GRA": 5}),
    ("Scores: TA: 6, CC: 7, LR 6, GRA=5.", {"TA": 6, "CC": 7, "LR": 6, "GRA": 5}),
    ('{"TA": 6, "CC": 7}', None),  # a band missing
    ('{"TA": 10, "CC": 7, "LR": 6, "GRA": 5}', None),  # out of range
    ("6.5 across the board", None),
])
def test_rubric_answer_parsing(answer, bands):
    from pipeline.rubric import parse_bands

    assert parse_bands(answer) == bands


def test_rubric_answer_without_bands_is_asked_again_then_invalid(tmp_path, sample_dir):
    def vague(request: dict, key: str) -> str:
        return "A solid essay overall." if "experienced IELTS examiner" in first_text(request) else fair(request, key)

    with FakeLLM(reply=vague, key_pattern=TITLE_KEY) as llm:
        config, store = setup_run(str(tmp_path / "store"), sample_dir, tmp_path, llm, "judge.rubric=true",
                                  "judge.comparisons=[[structured, baseline]]", "judge.limit=2")
        assert run_stage(config, store, "judge") and run_stage(config, store, "report")
    scored = [r for r in verdicts(store, config) if r["order"] == "rubric"]
    assert len(scored) == 4 and all(r["verdict"] == "invalid" and r["attempts"] == 2 for r in scored)
    assert all(r["raw_answer"] == "A solid essay overall." and "without all four bands" in r["reason"] for r in scored)
    retries = [r for r in llm.requests if r["messages"][-1]["content"] == rubric_reminder()]
    assert len(retries) == 4
    rubric = store.get_json(f"{config.run.id}/report/summary.json")["rubric"]
    assert rubric["models"]["structured"]["scored"] == 0 and rubric["models"]["structured"]["invalid"] == 2


def rubric_reminder() -> str:
    from pipeline.rubric import REMINDER

    return REMINDER
