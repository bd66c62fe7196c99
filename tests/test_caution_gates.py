"""Gates for what a weak or cautious teacher writes instead of an essay: refusals and requests for more input,
emoji and hashtags, and copies of the prompt's own data block (pipeline.quality). The answers below are the
ones a real 0.5B teacher gave on the demo's prompts (issue 26), completed to the demo's word limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_llm import FakeLLM, prompt_text

from pipeline.config import TeacherSection, load_config
from pipeline.essays import word_count
from pipeline.executors.local import run_pipeline, run_stage
from pipeline.prompts import (
    FINAL_LINE,
    FRAMING,
    NO_IMAGE,
    OCR_HEADING,
    TABLE_HEADING,
    TEACHER_TYPES,
    chart_data,
    teacher_template,
)
from pipeline.quality import (
    DATA_ECHO_WORDS,
    copied_run,
    data_echo,
    emoji_and_hashtags,
    failure_modes,
    gate_findings,
    refusal,
)

REPO = Path(__file__).resolve().parents[1]

# What the 0.5B teacher answered on two Pew charts (the first sentences verbatim), padded to ~110 words
REFUSAL = ("I'm sorry, but I can't assist with that request. The chart on naturalization rates is not something I "
           "am able to describe without seeing it, and I would not want to give you figures that may be wrong. "
           "Naturalization is an important topic, and many immigrants choose to become citizens after living in "
           "the country for several years. There are many resources online that explain the process and the "
           "statistics in detail, and the official government websites publish the latest numbers every year. "
           "I encourage you to consult them for accurate information about this subject and the trends over time. "
           "Thank you for your understanding, and good luck with your essay! \U0001F31F\u2728 #Naturalization "
           "#Immigration")
ASKS_FOR_IMAGE = ("Could you please provide me with the chart image or the full data table? Without seeing the "
                  "chart itself it is difficult to describe the trends accurately, compare the groups or pick out "
                  "the key figures that an IELTS examiner expects in a Task 1 answer. Once I have the image, I will "
                  "write a complete essay in the three-step structure you asked for: a description of the graph, "
                  "two body paragraphs comparing the main features and trends, and an overview of the data. The "
                  "essay will use Band 9 vocabulary, avoid repetition and stay below the word limit that you set "
                  "for the task, so that it can be used directly as a model answer for your students.")

PEW_OCR = ("Share of Americans who say they have ever used an online dating site or app\n% of U.S. adults | "
           "Ages 18-29 | 48 | 30-49 | 38 | 50-64 | 16 | 65+ | 13\nNote: Respondents who did not give an answer are "
           "not shown.\nSource: Survey of U.S. adults conducted Oct. 16-28, 2019.\nPEW RESEARCH CENTER")
# The third answer repeated the prompt's OCR block and its placeholder line three times
OCR_ECHO = ("The chart shows the following information.\n\n" +
            "\n\n".join(f"{PEW_OCR}\n[{NO_IMAGE}]" for _ in range(3)))


@pytest.fixture
def demo_gates() -> TeacherSection:
    return load_config(REPO / "configs/local.yaml").teacher


def modes(text: str, cfg: TeacherSection, **kw) -> set[str]:
    return {mode for mode, _ in gate_findings(text, None, cfg, **kw)}


def test_refusals_and_requests_for_input_are_rejected(demo_gates):
    assert 90 <= word_count(REFUSAL) <= 250 and 90 <= word_count(ASKS_FOR_IMAGE) <= 250
    assert modes(REFUSAL, demo_gates) == {"refusal", "emoji"}  # nothing else catches it under the demo's gates
    assert modes(ASKS_FOR_IMAGE, demo_gates) == {"refusal"}
    assert refusal(REFUSAL) == "I'm sorry" and refusal(ASKS_FOR_IMAGE) == "Could you please provide"
    for text in ("Unfortunately, I do not have access to the chart.", "As an AI language model, I cannot see images.",
                 "I am unable to view the image you attached.", "Please share the data so that I can help.",
                 "Let me know if you need anything else!", "I would need more information about the survey."):
        assert refusal(text), text
    assert "refusal" in failure_modes(REFUSAL)  # the report's detectors name it too


def test_emoji_and_hashtags_are_rejected(demo_gates):
    assert emoji_and_hashtags(REFUSAL) == ["\U0001F31F", "\u2728", "#Naturalization", "#Immigration"]
    assert emoji_and_hashtags("Sales rose sharply \U0001F4C8 in 2019.") == ["\U0001F4C8"]
    assert emoji_and_hashtags("A thumbs up \U0001F44D\U0001F3FD and a star \u2B50\uFE0F.") == \
        ["\U0001F44D", "\U0001F3FD", "\u2B50"]
    # ranks, C#, markdown headings, dashes, degrees and currency signs are not emoji or hashtags
    assert emoji_and_hashtags("China ranked #1 in C# jobs at 25\u00b0C \u2013 \u00a312 \u20ac5 \u00d72\n# Title") == []


def test_copies_of_the_prompts_data_block_are_rejected(demo_gates):
    chart = {"title": "Share of Americans who say they have ever used an online dating site or app",
             "ocr_text": PEW_OCR}
    data = chart_data(chart)
    assert data.startswith(OCR_HEADING)
    assert modes(OCR_ECHO, demo_gates, title=chart["title"], data=data) >= {"data_echo"}
    # the placeholder line is part of the prompt's fixed text: an answer that copies it is an echo
    assert "prompt_echo" in modes(f"The chart is described below.\n[{NO_IMAGE}]", demo_gates,
                                  instructions=FRAMING)
    # a table copied row by row, without markdown pipes at the line starts
    rows = [["Country", "2018", "2019"], ["China", "1,402", "1,410"], ["India", "1,353", "1,366"],
            ["United States", "327", "328"], ["Indonesia", "267", "270"]]
    table_chart = {"title": "Population by country (in millions)", "table": rows}
    copied = "The table shows:\n" + "\n".join(" | ".join(r) for r in rows[1:])
    found = gate_findings(copied, rows, demo_gates, table_chart["title"], data=chart_data(table_chart))
    assert [m for m, _ in found] == ["too_short", "data_echo"]
    # quoting the title and the figures in prose is a description, not a copy
    prose = ("The table compares the population of four countries in 2018 and 2019. China had the largest, "
             "rising from 1,402 million to 1,410 million, while India grew from 1,353 million to 1,366 million.")
    assert data_echo(prose, chart_data(table_chart), table_chart["title"]) is None
    long_title = "Share of U.S. adults who say they have ever used an online dating site or app, by age group"
    assert data_echo(f'The chart "{long_title}" gives four age groups.', f"{long_title}\n18-29 | 48",
                     long_title) is None


def test_copied_run_is_the_first_run_in_the_texts_order():
    source = "Alpha beta gamma delta epsilon zeta eta theta iota kappa."
    assert copied_run("Theta alpha beta gamma delta.", source, n=4) == "alpha beta gamma delta"
    assert copied_run("Beta alpha delta gamma zeta epsilon.", source, n=3) is None  # the source's words, reordered
    assert copied_run("Alpha beta gamma. Eta theta iota.", source, n=3, exclude="alpha beta gamma") == "eta theta iota"


def test_real_essays_pass_the_new_gates(sample_dir):
    """None of the sample's 120 human summaries, nor any example essay of the prompts, is a refusal or uses
    emoji; no summary copies DATA_ECHO_WORDS words from its own chart's data block."""
    from pipeline.stages.ingest import load_table

    rows = [json.loads(line) for line in (sample_dir / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 120
    for text in [teacher_template(t).text.split(FINAL_LINE)[0] for t in TEACHER_TYPES]:
        assert refusal(text) is None and emoji_and_hashtags(text) == [], text[:200]
    checked, quoted = 0, 0
    for r in rows:
        table, ocr = load_table(sample_dir / r["data"], r["data_format"]) if r.get("data") else (None, None)
        data = chart_data({"table": table, "ocr_text": ocr})
        assert refusal(r["summary"]) is None, r["id"]
        # a chart of the most used hashtags may quote them (statista-two_col-...: #Moonlight, #LaLaLand)
        assert emoji_and_hashtags(r["summary"], r["title"], data) == [], r["id"]
        quoted += bool(emoji_and_hashtags(r["summary"]))
        if data:
            assert data_echo(r["summary"], data, r["title"]) is None, r["id"]
            assert data_echo(r["summary"], data, r["title"], n=DATA_ECHO_WORDS - 4) is None, r["id"]  # margin
            checked += 1
    assert checked >= 110 and quoted == 1


def _echo_reply(request: dict, key: str) -> str:
    """An answer that copies the prompt's data block (or, for a chart without data, its placeholder line)."""
    text = prompt_text(request)
    block = ""
    for heading in (TABLE_HEADING, OCR_HEADING):
        if heading in text:
            block = text.split(heading, 1)[1].split(FINAL_LINE, 1)[0]
    words = (block.split() or NO_IMAGE.split()) * 40
    return f"The chart shows the following data.\n\n{' '.join(words[:140])}\n\n[{NO_IMAGE}]"


def _refusal_reply(request: dict, key: str) -> str:
    return REFUSAL if len(key) % 2 else ASKS_FOR_IMAGE + " \U0001F64F #IELTS"


@pytest.mark.parametrize("reply,expected", [(_refusal_reply, {"refusal", "emoji"}),
                                            (_echo_reply, {"data_echo", "prompt_echo"})])
def test_a_teacher_that_only_refuses_or_echoes_gets_nothing_accepted(tmp_path, sample_dir, reply, expected):
    """The demo's gates (configs/local.yaml: no structure or number checks, 90-250 words) against an endpoint
    that answers only polite refusals with emoji and hashtags, or only copies of the prompt's data block:
    every chart ends rejected, and by the new gates alone (nothing else in the demo's gates objects)."""
    with FakeLLM(reply=reply) as llm:
        sets = [f"store.uri={tmp_path / 's'}", "run.id=t", f"data.source={sample_dir}", "data.limit=10",
                "teacher.embedded=false", f"teacher.base_url={llm.base_url}", "teacher.concurrency=4"]
        cfg = load_config(REPO / "configs/local.yaml", sets)
        store = run_pipeline(cfg, ["ingest"])
        assert run_stage(cfg, store, "teacher")
    summary = json.loads(store.get_text("t/teacher/_SUCCESS"))["summary"]
    assert summary["charts"] >= 8 and summary["accepted"] == 0, summary
    assert llm.total == summary["charts"] * cfg.teacher.max_attempts
    records = [store.get_json(k) for k in store.list("t/teacher/records/") if k.endswith(".json")]
    seen = set()
    for rec in records:
        for failures in rec["failures"]:
            codes = {f.split(" ", 1)[0] for f in failures}
            assert all(f.startswith(("refuses or asks", "uses emoji", "copies the data", "copies the instructions"))
                       for f in failures), failures
            seen |= codes
        assert rec["reason_code"].removeprefix("gate:") in expected
    assert seen
