"""Limits that hold across workers and pods, over real HTTP to tests/fake_llm.py: the rate limit split across
shards, the back-off after a 429 shared by every request of a client, the store's pool sized to the workers."""

from __future__ import annotations

import asyncio
import logging
import time

from fake_llm import FakeLLM

from pipeline.config import load_config
from pipeline.context import StageContext, store_for
from pipeline.items import run_stage_items
from pipeline.llm import LLMClient, run_items
from pipeline.records import RecordSet, Shard
from pipeline.store import LocalStore, open_store, pool_size_for


def _arrivals(llm: FakeLLM, first: dict[str, str] | None = None) -> list[tuple[str, int, float]]:
    """Record (key, attempt, time.monotonic()) of every request the server gets; ``first``: key -> the
    action of its first attempt."""
    seen: list[tuple[str, int, float]] = []

    def rule(key: str, attempt: int):
        seen.append((key, attempt, time.monotonic()))
        return (first or {}).get(key) if attempt == 1 else None

    llm.rule = rule
    return seen


async def _ask(item: str, client: LLMClient) -> dict:
    done = await client.chat([{"role": "user", "content": f'<TITLE_LAST>: "{item}"'}])
    return {"id": item, "status": "accepted", "essay": done.text}


def _span(seen: list[tuple[str, int, float]]) -> float:
    times = sorted(t for _, _, t in seen)
    return times[-1] - times[0]


def test_requests_per_minute_is_split_across_the_shards(tmp_path):
    """teacher.requests_per_minute is for the whole stage: with 2 shards each pod sends at half the rate
    (600 rpm -> 300 rpm a shard: one request per 0.2 s), measured on the server."""
    shard = Shard(0, 2)
    items = [i for i in (f"c{n}" for n in range(40)) if shard.owns(i)][:6]
    with FakeLLM() as llm:
        def run(run_id: str, shard: Shard) -> None:
            cfg = load_config(None, [f"store.uri={tmp_path}", f"run.id={run_id}", f"teacher.base_url={llm.base_url}",
                                     "teacher.requests_per_minute=600", "teacher.concurrency=6"])
            ctx = StageContext(config=cfg, store=LocalStore(tmp_path), stage="teacher", shard=shard)
            assert run_stage_items(ctx, cfg.teacher, items, _ask, item_id=str).written == len(items)

        seen = _arrivals(llm)
        run("sharded", shard)
        assert len(seen) == len(items)
        assert _span(seen) >= 5 * 0.2 * 0.9  # 6 requests, 0.2 s apart: not 0.1 s (the unsplit 600 rpm)
        seen.clear()
        run("whole", Shard())
        assert len(seen) == len(items) and 5 * 0.1 * 0.9 <= _span(seen) < 5 * 0.2 * 0.9  # one shard: 600 rpm


def test_a_429_holds_every_request_of_the_client_until_retry_after(tmp_path):
    """After one 429 with Retry-After: 0.6, no request of the client reaches the server before it expires:
    not the retry, and not the requests other workers start meanwhile."""
    with FakeLLM(retry_after=0.6) as llm:
        cfg = load_config(None, [f"teacher.base_url={llm.base_url}", "teacher.concurrency=8"]).teacher
        seen = _arrivals(llm, first={"a": "429"})

        async def go() -> None:
            client = LLMClient(cfg, name="teacher")
            first = asyncio.create_task(client.chat([{"role": "user", "content": '<TITLE_LAST>: "a"'}]))
            while not llm.actions.get("429"):
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)  # the 429 has reached the client
            others = [client.chat([{"role": "user", "content": f'<TITLE_LAST>: "b{i}"'}]) for i in range(5)]
            await asyncio.gather(first, *others)
            await client.aclose()

        asyncio.run(go())
    limited = seen[0][2]
    assert seen[0][:2] == ("a", 1) and llm.actions["429"] == 1 and len(seen) == 7
    later = [t - limited for _, _, t in seen[1:]]
    assert min(later) >= 0.6 * 0.95, later  # counted on the server: nothing before Retry-After expired


def test_the_store_pool_is_sized_to_the_workers(tmp_path, s3_bucket, caplog):
    """The S3 connection pool holds a connection per runner thread (2 x concurrency workers + the lease
    heartbeat): from the run's config when the store is opened with it, grown by the runner when the store
    was opened before (with the default 32); no connection is discarded."""
    cfg = load_config(None, [f"store.uri={s3_bucket}", "teacher.concurrency=40", "judge.concurrency=4"])
    assert pool_size_for(40) == 82
    assert store_for(cfg).client.meta.config.max_pool_connections == 82

    store = open_store(s3_bucket)
    assert store.client.meta.config.max_pool_connections == 32
    items = [f"c{i}" for i in range(120)]
    with FakeLLM(latency=0.05) as llm:
        client = LLMClient(load_config(None, [f"teacher.base_url={llm.base_url}", "teacher.concurrency=40"]).teacher,
                           name="teacher")
        with caplog.at_level(logging.WARNING, logger="urllib3"):
            summary = run_items(items, _ask, records=RecordSet(store, "run/teacher/records"), client=client,
                                item_id=str)
    assert summary.written == len(items)
    assert store.client.meta.config.max_pool_connections == 82
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]
