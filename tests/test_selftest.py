"""The judge's self-test (pipeline/selftest.py) through the real judge and report stages, against fake judges
on a real HTTP server (tests/fake_llm.py): the good text is the chart's human-written summary, never the
reference the judge is shown, so a judge that matches strings, prefers length or the first position fails,
and one that knows the corruption passes."""

from __future__ import annotations

import logging
import random
from collections import Counter

import pytest
from eval_helpers import seed_run, split_charts
from fake_llm import FakeLLM
from test_judge import TITLE_KEY, fast_backoff, first_text, shown  # noqa: F401 -- fast_backoff: autouse fixture

from pipeline.context import store_for
from pipeline.essays import prose_form
from pipeline.executors.local import run_stage
from pipeline.quality import numbers_in
from pipeline.selftest import PLANTED, good_essay, planted


def reference_shown(request: dict) -> str:
    head = first_text(request).split("\n\n    <FIRST>")[0]
    return head.split("ought to compare to:\n", 1)[1].split("\n", 1)[1]


def chrf(text: str, reference: str) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF(word_order=2).sentence_score(text, [reference]).score


def string_matcher(request: dict, key: str) -> str:
    """Picks the text closer to the reference by chrF++ (the first one when equal)."""
    first, second = shown(request)
    reference = reference_shown(request)
    return "<FIRST>" if chrf(first, reference) >= chrf(second, reference) else "<SECOND>"


def longer_wins(request: dict, key: str) -> str:
    first, second = shown(request)
    return "<FIRST>" if len(first) >= len(second) else "<SECOND>"


def always_first(request: dict, key: str) -> str:
    return "<FIRST>"


def run_selftest(tmp_path, sample_dir, reply, *extra: str) -> tuple[dict, dict, list, str, str, str]:
    with FakeLLM(reply=reply, key_pattern=TITLE_KEY) as llm:
        config = seed_run(str(tmp_path / "store"), sample_dir, tmp_path, overrides=(
            f"judge.base_url={llm.base_url}", "judge.model=fake-judge", "judge.timeout_s=2", "judge.max_retries=1",
            "judge.selftest_charts=7", "judge.comparisons=[[structured, baseline]]", "judge.limit=2", *extra))
        store = store_for(config)
        assert run_stage(config, store, "judge") and run_stage(config, store, "report")
    prefix = f"{config.run.id}/report/"
    return (store.get_json(prefix + "summary.json"), {"config": config, "store": store}, llm.requests,
            store.get_text(prefix + "report.md"), store.get_text(prefix + "report.html"), config.run.id)


def oracle_for(good_texts: set[str]):
    """Knows the corruption: the untouched human summary is the good text; real pairs: the first."""
    def reply(request: dict, key: str) -> str:
        first, second = shown(request)
        return "<SECOND>" if second in good_texts and first not in good_texts else "<FIRST>"
    return reply


def test_planted_corruptions_of_a_human_summary(sample_dir):
    import json

    rows = [json.loads(line) for line in (sample_dir / "manifest.jsonl").read_text().splitlines()]
    summary = next(r["summary"] for r in rows if r["id"] == "pew-multi_col-14")
    good = good_essay(summary, "prose")
    assert good.count("\n\n") == 1 and "36.6 million" in good
    out = {k: planted(good, k, random.Random(k)) for k in PLANTED}
    old, new = numbers_in(good), numbers_in(out["figures"])
    assert len(old) == len(new) and "2017" in out["figures"]  # every figure but the years moved ...
    moves = [abs(n / o - 1) for o, n in zip(old, new) if o != n]
    assert len(moves) == len([o for o in old if not 1900 <= o <= 2100]) and all(0.06 < m < 0.31 for m in moves)
    words = len(good.split())
    assert len(out["truncated"].split()) == words // 2 and good.startswith(out["truncated"])  # cut after half
    assert all(line.startswith("- ") for line in out["bullets"].splitlines()) and len(out["bullets"].splitlines()) > 3
    assert out["markers"].startswith("1. <Describe a graph>:") and "Paragraph 1:" in out["markers"]
    assert prose_form(out["markers"]).split() == good.split()  # the same words, with the markers added
    assert planted(out["markers"], "markers", random.Random(0)) == out["markers"]  # markers already there: unchanged
    with pytest.raises(ValueError, match="unknown planted corruption 'other'"):
        planted(good, "other", random.Random(0))


def test_oracle_passes_and_the_report_leads_with_the_selftest(tmp_path, sample_dir, caplog):
    caplog.set_level(logging.INFO)
    good = set()

    def reply(request: dict, key: str) -> str:
        return oracle_for(good)(request, key)

    from eval_helpers import pick_charts

    for c in pick_charts(sample_dir):
        good.add(good_essay(c["summary"], "prose"))
    summary, ctx, requests, md, html, run_id = run_selftest(tmp_path, sample_dir, reply)
    charts = split_charts(ctx["store"], ctx["config"])
    st = summary["selftest"]
    assert set(st["by_corruption"]) == set(PLANTED)
    assert (st["accuracy"], st["trustworthy"], st["failed_corruptions"]) == (1.0, True, [])
    assert st["by_corruption"]["bullets"]["n"] == len(charts) == 7 and st["ci95"][0] > 0.85
    planted_requests = [r for r in requests if any(shown(r)[i] in good for i in (0, 1))]
    assert len(planted_requests) == 2 * st["n"]  # both orders of every planted pair
    # never the reference: the good text is the human summary, the reference the teacher's essay
    assert all(reference_shown(r).strip() not in shown(r) for r in planted_requests)
    assert all(c["evidence"] and c["evidence_note"] is None for c in summary["comparisons"])
    assert "not evidence" not in md and "not evidence" not in html
    assert md.index("## Judge self-test") < md.index("## Win rates") < md.index("## Deterministic judge")
    assert "| figures |" in md
    assert html.index("<h2>Judge self-test</h2>") < html.index("<h2>Win rates")
    logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("report: ")]
    assert logs[0].startswith("report: judge self-test passed: ") and "NOT EVIDENCE" not in " ".join(logs)


@pytest.mark.parametrize("name, reply, failing", [
    ("string matcher", string_matcher, {"figures"}),
    ("longer wins", longer_wins, {"bullets", "markers"}),
    ("always first", always_first, set(PLANTED)),
])
def test_cheating_judges_fail_and_their_win_rates_are_not_evidence(tmp_path, sample_dir, caplog, name, reply,
                                                                     failing):
    caplog.set_level(logging.INFO)
    summary, _, _, md, html, _ = run_selftest(tmp_path, sample_dir, reply)
    st = summary["selftest"]
    print(name, {k: (v["correct"], v["n"]) for k, v in st["by_corruption"].items()}, st["accuracy"])
    assert st["trustworthy"] is False and failing <= set(st["failed_corruptions"])
    assert all(c["evidence"] is False and c["evidence_note"] == "not evidence: the judge failed its self-test"
               for c in summary["comparisons"] + summary["comparisons_as_written"])
    assert summary["warnings"][0].startswith("Judge self-test:") and "not evidence" in summary["warnings"][0]
    assert "## Win rates (not evidence: the judge failed its self-test)" in md
    # a judge that failed: the report leads with the self-test, then the deterministic measures
    assert md.index("## Judge self-test") < md.index("## Deterministic judge") < md.index("## Win rates")
    assert html.index("<h2>Judge self-test</h2>") < html.index("<h2>Deterministic judge</h2>") < html.index(
        "<h2>Win rates")
    assert "(layout-neutral) (not evidence: the judge failed its self-test) |" in md
    assert "(not evidence: the judge failed its self-test)</span></h2>" in html
    logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("report: ")]
    assert logs[0].startswith("report: judge self-test FAILED")
    rates = [line for line in logs if " win rate " in line]
    assert rates and all(line.endswith("-- NOT EVIDENCE: THE JUDGE FAILED ITS SELF-TEST") for line in rates)
    assert Counter(" win rate " in line for line in logs[-len(rates) - 1:-1])[True] == len(rates)  # the last lines
