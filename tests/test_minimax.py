"""MiniMax as documented (docs/teacher.md): ``config --check`` refuses what MiniMax's API refuses, the client
keeps within the token cap, and the rehearsal's reasoning server (tests/reasoning_llm.py, ``minimax=True``)
refuses the same requests, so a shipped config that breaks a documented limit fails a test."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from reasoning_llm import ReasoningLLM
from test_teacher import fast_backoff  # noqa: F401 (autouse: quick retries, a key in MINIMAX_API_KEY)

from pipeline.checks import check_config
from pipeline.config import load_config, token_limit
from pipeline.llm import LLMClient, LLMError
from pipeline.minimax import accepts_images, output_cap, violations

REPO = Path(__file__).resolve().parents[1]


def test_documented_limits():
    assert output_cap("MiniMax-M2.7") == 2048 and output_cap("smollm2-135m-instruct") is None
    assert accepts_images("MiniMax-M3") and not accepts_images("MiniMax-M2.7") and not accepts_images("MiniMax-M1")
    assert violations("MiniMax-M2.5", temperature=0.0, limit=4096, images=True) == [
        "temperature 0 outside (0, 1]", "4096 completion tokens requested; the cap is 2048",
        "MiniMax-M2.5 takes text only; images are understood by MiniMax-M3"]
    assert violations("MiniMax-M2.7", temperature=1.0, limit=2048, images=False) == []
    assert violations("gpt-4o-mini", temperature=0.0, limit=100_000, images=True) == []  # not MiniMax's rules


def test_shipped_cluster_config_keeps_the_limits():
    config = load_config(REPO / "configs/cluster.yaml")
    for llm in (config.teacher, config.judge_llm()):
        assert "minimax" in llm.model.lower() and 0 < llm.temperature <= 1 and token_limit(llm) <= 2048
        assert not llm.vision or accepts_images(llm.model)
    assert load_config(None).judge.temperature > 0  # the judge's default is valid for MiniMax


@pytest.mark.parametrize("override, key", [
    ("teacher.temperature=0", "teacher.temperature=0"),
    ("teacher.temperature=1.5", "teacher.temperature=1.5"),
    ("judge.temperature=0", "judge.temperature=0"),
    ("teacher.max_tokens=1024", "teacher.max_tokens=1024 + teacher.reasoning_tokens=1536"),
    ("teacher.reasoning_tokens=4096", "teacher.max_tokens=512 + teacher.reasoning_tokens=4096"),
    ("judge.reasoning_tokens=4096", "judge.max_tokens=16 + judge.reasoning_tokens=4096"),
    ("teacher.vision=true", "teacher.vision=true"),
    ("teacher.essay_grammar=true", "teacher.essay_grammar=true"),
    ("teacher.model=MiniMax-M1", "teacher.vision=false"),  # no finding: M1 with vision off is valid
])
def test_check_refuses_what_minimax_refuses(override, key):
    findings = check_config(load_config(REPO / "configs/cluster.yaml", [override]))
    if key == "teacher.vision=false":
        assert findings == []
        return
    assert any(f.startswith(key) for f in findings), findings
    assert all("\n" not in f for f in findings)
    ok = check_config(load_config(REPO / "configs/cluster.yaml", [override, "teacher.model=gpt-4o-mini",
                                                                  "judge.model=gpt-4o-mini"]))
    assert not [f for f in ok if f.startswith(key)]  # MiniMax's rules, not everyone's
    assert check_config(load_config(REPO / "configs/cluster.yaml", ["teacher.vision=true",
                                                                    "teacher.model=MiniMax-M3"])) == []


def _chat(cfg, content) -> object:
    client = LLMClient(cfg, name="teacher")

    async def go():
        try:
            return await client.chat([{"role": "user", "content": content}])
        finally:
            await client.aclose()
    return asyncio.run(go())


def _cluster_teacher(llm: ReasoningLLM, *extra: str):
    return load_config(REPO / "configs/cluster.yaml", [f"teacher.base_url={llm.base_url}", "teacher.timeout_s=5",
                                                       "teacher.max_retries=1", *extra]).teacher


def test_rehearsal_server_refuses_what_minimax_refuses():
    """The shipped teacher's requests pass; each broken limit gets a 400 naming it (a final error: the chart
    would end rejected with it, never a silent success)."""
    image = [{"type": "text", "text": '<TITLE_LAST>: "x"'},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    with ReasoningLLM(think_tokens=300, minimax=True) as llm:
        done = _chat(_cluster_teacher(llm), '<TITLE_LAST>: "x"')
        assert done.text.startswith("1. <Describe a graph>") and "<think>" in done.raw_text  # M2.x: in content
        assert llm.limits == [2048] and llm.rejected == []
        for extra, content, why in [(("teacher.temperature=0",), '<TITLE_LAST>: "x"', "temperature 0"),
                                    (("teacher.reasoning_tokens=4096",), '<TITLE_LAST>: "x"', "max tokens 4608"),
                                    ((), image, "does not accept images")]:
            with pytest.raises(LLMError, match="HTTP 400"):
                _chat(_cluster_teacher(llm, *extra), content)
            assert why in llm.rejected[-1]
        done = _chat(_cluster_teacher(llm, "teacher.model=MiniMax-M3"), image)  # M3 understands images
        assert done.text


def test_a_cut_answer_is_asked_again_within_the_cap():
    """A cut answer is asked once more with twice the room, but never above MiniMax's cap: 1,200 -> 2,048
    (not 2,400), and at the cap already no second request that the API would refuse."""
    with ReasoningLLM(think_tokens=1900, minimax=True) as llm:
        done = _chat(_cluster_teacher(llm, "teacher.reasoning_tokens=688"), '<TITLE_LAST>: "x"')
        assert llm.limits == [1200, 2048] and llm.rejected == [] and done.truncated
    with ReasoningLLM(think_tokens=2100, minimax=True) as llm:
        done = _chat(_cluster_teacher(llm), '<TITLE_LAST>: "x"')
        assert llm.limits == [2048] and llm.rejected == [] and done.truncated
