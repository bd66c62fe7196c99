"""Reasoning models (issue: the cluster judge could not answer): the thinking counts against the token limit,
so the client asks for max_tokens + reasoning_tokens, reads a separate reasoning field, retries a cut answer
once with twice the room and then records it as cut — never an empty answer passed off as an answer."""

from __future__ import annotations

import asyncio

import pytest
from eval_helpers import seed_run
from reasoning_llm import ReasoningLLM
from test_judge import COMPARISONS, TITLE_KEY, fair

from pipeline.config import load_config
from pipeline.context import store_for
from pipeline.executors.local import run_stage
from pipeline.llm import LLMClient


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(LLMClient, "BACKOFF_INITIAL", 0.01)
    monkeypatch.setattr(LLMClient, "BACKOFF_MAX", 0.05)


def judge_run(tmp_path, sample_dir, llm, *extra):
    """The cluster config's judge (MiniMax-M1, max_tokens 16) against a reasoning server."""
    config = seed_run(str(tmp_path / "store"), sample_dir, tmp_path, n=4, overrides=(
        f"judge.base_url={llm.base_url}", "judge.model=MiniMax-M1", "judge.max_tokens=16", "judge.max_retries=1",
        "judge.timeout_s=5", *extra))
    store = store_for(config)
    assert run_stage(config, store, "judge")
    return store.get_jsonl(f"{config.run.id}/judge/verdicts.jsonl")


@pytest.mark.parametrize("separate_field", [False, True])
def test_reasoning_judge_answers_with_room_to_think(tmp_path, sample_dir, separate_field):
    with ReasoningLLM(think_tokens=900, separate_field=separate_field, reply=fair, key_pattern=TITLE_KEY) as llm:
        rows = judge_run(tmp_path, sample_dir, llm)
    assert rows and all(r["verdict"] != "invalid" for r in rows)  # the answer is read after the thinking
    assert all(r["verdict"] == "a" for r in rows if r["comparison"] in COMPARISONS)  # the fair judge's
    assert set(llm.limits) == {16 + 1536} and set(llm.finish_reasons) == {"stop"}  # judge answer + thinking budget


def test_judge_without_room_to_think_records_cut_answers_not_guesses(tmp_path, sample_dir):
    """The old cluster setting (16 tokens in all): every answer is cut; each is asked once more with twice
    the room, then recorded invalid saying why — no reminder round, no empty 'answer'."""
    with ReasoningLLM(think_tokens=900, reply=fair, key_pattern=TITLE_KEY) as llm:
        rows = judge_run(tmp_path, sample_dir, llm, "judge.reasoning_tokens=0")
    assert rows and all(r["verdict"] == "invalid" for r in rows)
    assert all("cut at the token limit" in r["reason"] and "reasoning_tokens" in r["reason"] for r in rows)
    assert sorted(llm.limits) == [16] * len(rows) + [32] * len(rows)  # concurrent: any order


def test_rate_limited_reasoning_server_is_waited_for(tmp_path, sample_dir):
    with ReasoningLLM(think_tokens=300, rate_limit_every=3, reply=fair, key_pattern=TITLE_KEY) as llm:
        rows = judge_run(tmp_path, sample_dir, llm, "judge.max_retries=6")
    assert llm.actions["429"] > 0 and all(r["verdict"] != "invalid" for r in rows)


def test_client_sends_max_completion_tokens_to_openai_reasoning_models():
    config = load_config(None, ["teacher.model=o3-mini", "teacher.max_tokens=50", "teacher.reasoning_tokens=1000"])
    with ReasoningLLM(think_tokens=10) as llm:
        cfg = config.teacher.model_copy(update={"base_url": llm.base_url})

        async def ask():
            client = LLMClient(cfg)
            try:
                return await client.chat([{"role": "user", "content": "hello"}])
            finally:
                await client.aclose()

        done = asyncio.run(ask())
    assert "max_completion_tokens" in llm.requests[0] and "max_tokens" not in llm.requests[0]
    assert llm.limits == [1050] and done.finish_reason == "stop" and not done.truncated
