"""The item runner (pipeline.llm.runner) against a real HTTP server on loopback (tests/fake_llm.py)."""

from __future__ import annotations

import asyncio

import pytest
from fake_llm import FakeLLM

from pipeline.config import load_config
from pipeline.llm import LLMClient, LLMError, run_items
from pipeline.records import RecordSet
from pipeline.store import LocalStore


@pytest.fixture
def llm():
    with FakeLLM() as server:
        yield server


def _client(llm: FakeLLM, *extra: str) -> LLMClient:
    cfg = load_config(None, [f"teacher.base_url={llm.base_url}", "teacher.timeout_s=1", *extra]).teacher
    return LLMClient(cfg, name="teacher", backoff_initial=0.01, backoff_max=0.02)


async def _ask(item: str, client: LLMClient) -> dict:
    done = await client.chat([{"role": "user", "content": f'<TITLE_LAST>: "{item}"'}])
    return {"id": item, "status": "accepted", "essay": done.text}


def test_a_bug_in_the_handler_stops_the_stage_with_its_traceback(tmp_path, llm):
    """A KeyError in the stage's own code is a bug: it propagates as itself (not an 'api error' record,
    not a fatal endpoint error); items in flight still get their record, no new item starts."""
    records = RecordSet(LocalStore(tmp_path), "run/teacher/records")
    items = [f"c{i}" for i in range(20)]

    async def handle(item: str, client: LLMClient) -> dict:
        record = await _ask(item, client)
        if item == "c3":
            return {}["missing"]  # the bug
        return record

    with pytest.raises(KeyError, match="missing") as err:
        run_items(items, handle, records=records, client=_client(llm, "teacher.concurrency=2"), item_id=str)
    assert err.traceback[-1].name == "handle"  # the handler's own frame, not a wrapper's
    done = records.done_ids()
    assert "c3" not in done and len(done) < len(items)  # stopped: not every item was started
    assert all(records.read(i)["status"] == "accepted" for i in done)  # in-flight items were recorded
    assert llm.total <= len(done) + 1 + 4  # the bug's item + at most 2 x concurrency items in flight


def test_a_bug_inside_a_request_is_not_an_api_error(llm):
    """A TypeError raised while building a request (a non-JSON-able message) is not retried, not counted
    as a failed request and not turned into LLMError."""
    import asyncio

    client = _client(llm, "teacher.max_retries=3")

    async def go():
        try:
            await client.chat([{"role": "user", "content": object()}])
        finally:
            await client.aclose()

    with pytest.raises(TypeError):
        asyncio.run(go())
    assert llm.total == 0 and client.usage.failed == 0 and client.usage.retries == 0
    assert not isinstance(TypeError(), LLMError)


def test_timed_out_requests_are_counted_as_possibly_billed(tmp_path, llm):
    """A request past timeout_s may still be finished (and billed) by the server: counted apart, and the item
    stays pending (no record) when the retries run out."""
    llm.hang_s = 1.0
    llm.rule = lambda key, n: "timeout" if key == "slow" else None
    records = RecordSet(LocalStore(tmp_path), "run/teacher/records")
    summary = run_items(["fast", "slow"], _ask, records=records, item_id=str,
                        client=_client(llm, "teacher.timeout_s=0.3", "teacher.max_retries=1"))
    assert summary.usage.timeouts == 2 and summary.transient.keys() == {"slow"}
    assert records.done_ids() == {"fast"} and "2 timed out (possibly billed)" in summary.line("teacher")


def test_the_client_sends_what_openais_create_sends(llm, monkeypatch):
    """The client posts the body as given (openai's create() would first walk it through its parameter
    transform): the server sees the same JSON body and the same Authorization as from create() with the
    same arguments, overrides and extra_body included."""
    import openai

    monkeypatch.setenv("TEST_LLM_KEY", "sk-test-123")
    cfg = load_config(None, [f"teacher.base_url={llm.base_url}", "teacher.api_key_env=TEST_LLM_KEY",
                             "teacher.model=m-1", "teacher.temperature=0.3"]).teacher
    messages = [{"role": "user", "content": [{"type": "text", "text": "<TITLE_LAST>: \"a\""},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]

    async def both() -> None:
        client = LLMClient(cfg, name="teacher")
        await client.chat(messages, extra_body={"min_tokens": 7}, top_p=0.5, n=3)
        await client.aclose()
        raw = openai.AsyncOpenAI(api_key="sk-test-123", base_url=cfg.base_url, max_retries=0)
        await raw.chat.completions.create(messages=messages, model="m-1", temperature=0.3, max_tokens=cfg.max_tokens,
                                          top_p=0.5, n=1, extra_body={"min_tokens": 7})
        await raw.close()

    asyncio.run(both())
    ours, theirs = llm.requests
    assert ours == theirs
    assert ours["min_tokens"] == 7 and ours["n"] == 1 and ours["messages"] == messages
    assert llm.auth == {"Bearer sk-test-123"}
