"""The teacher stage and the LLM client against a real HTTP server on loopback (tests/fake_llm.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml
from conftest import BUNDLED_TEACHER
from fake_llm import FakeLLM

from pipeline.config import load_config
from pipeline.context import StageContext
from pipeline.errors import ConfigError, PipelineError, StageError
from pipeline.executors.local import run_pipeline, run_stage
from pipeline.llm import LLMClient, LLMError, TransientLLMError, strip_think
from pipeline.records import Shard
from pipeline.stages.teacher import ESSAY_GRAMMAR

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-7f3a9c1e5b2d4f60"
RUN = "t"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(LLMClient, "BACKOFF_INITIAL", 0.02)
    monkeypatch.setattr(LLMClient, "BACKOFF_MAX", 0.1)
    monkeypatch.setenv("MINIMAX_API_KEY", KEY)


@pytest.fixture
def llm():
    with FakeLLM() as server:
        yield server


def overrides(store_uri: str, llm: FakeLLM, sample_dir: Path, *extra: str) -> list[str]:
    return [f"store.uri={store_uri}", f"run.id={RUN}", f"data.source={sample_dir}", f"teacher.base_url={llm.base_url}",
            "teacher.timeout_s=1", "teacher.concurrency=8", "teacher.vision=true", *extra]


def ingest(store_uri: str, llm: FakeLLM, sample_dir: Path, *extra: str):
    cfg = load_config(None, overrides(store_uri, llm, sample_dir, *extra))
    store = run_pipeline(cfg, ["ingest"])
    charts = store.get_jsonl(f"{RUN}/ingest/charts.jsonl")
    return cfg, store, charts


def teacher_records(store) -> dict[str, dict]:
    prefix = f"{RUN}/teacher/records/"
    return {k[len(prefix):-5]: store.get_json(k) for k in store.list(prefix) if k.endswith(".json")}


# --------------------------------------------------------------------------- the stage under faults


def test_every_chart_final_under_faults(store_uri, llm, sample_dir):
    """20 % of requests fail in every way; every chart still ends accepted or rejected with a reason."""
    llm.fault_rate, llm.think, llm.hang_s = 0.2, True, 1.5
    cfg, store, charts = ingest(store_uri, llm, sample_dir, "data.limit=60", "teacher.timeout_s=0.4")
    assert run_stage(cfg, store, "teacher")
    recs = teacher_records(store)
    assert set(recs) == {c["id"] for c in charts}
    for rec in recs.values():
        assert rec["status"] in ("accepted", "rejected")
        if rec["status"] == "accepted":
            assert rec["essay"].startswith("1. <Describe a graph>") and "<think>" not in rec["essay"]
            assert "987,654" not in rec["essay"] and "<think>" in rec["raw_answer"]
            assert rec["reason"] is None and rec["attempts"] >= 1 and rec["usage"]["completion_tokens"] > 0
        else:
            assert rec["reason"] and rec["essay"] == ""
        assert rec["template"] == f"teacher/{rec['type']}" and rec["template_version"] == "v1"
    faults = {a for a in llm.actions if a != "ok"}
    assert {"429", "500", "timeout", "garbage", "drop"} <= faults, llm.actions
    assert sum(r["status"] == "accepted" for r in recs.values()) >= len(charts) - 2  # retries absorb faults
    assert all(req.get("n") == 1 for req in llm.requests)
    rows = store.get_jsonl(f"{RUN}/teacher/essays.jsonl")
    assert [r["chart_id"] for r in rows] == [c["id"] for c in charts]
    summary = json.loads(store.get_text(f"{RUN}/teacher/_SUCCESS"))["summary"]
    assert summary["charts"] == len(charts) == summary["accepted"] + summary["rejected"]


def test_transient_errors_stay_pending_and_a_4xx_is_final(tmp_path, llm, sample_dir):
    """A 500 that outlasts the retries is not final: no record, the stage ends non-zero ("N pending:
    rerun") and the rerun completes it. A 400 is a definite answer: the chart ends rejected with it."""
    cfg, store, charts = ingest(str(tmp_path / "s"), llm, sample_dir, "data.limit=12", "teacher.max_retries=2")
    broken, bad_request = charts[0]["title"], charts[1]["title"]
    llm.rule = lambda key, n: "500" if key == broken else "400" if key == bad_request else None
    with pytest.raises(StageError, match=r"teacher: 1 charts pending: rerun \(transient errors, e\.g\. .*HTTP 500"):
        run_stage(cfg, store, "teacher")
    recs = teacher_records(store)
    assert charts[0]["id"] not in recs and llm.counts[broken] == 3  # 1 + max_retries, no record
    second = recs[charts[1]["id"]]
    assert second["status"] == "rejected" and second["reason_code"] == "api_error"
    assert "HTTP 400" in second["reason"] and llm.counts[bad_request] == 1
    assert all(r["status"] == "accepted" for cid, r in recs.items() if cid != charts[1]["id"])
    assert not store.exists(f"{RUN}/teacher/_SUCCESS")
    llm.rule = None  # the endpoint is back: the rerun pays for the pending chart only
    before = llm.total
    assert run_stage(cfg, store, "teacher")
    assert llm.total == before + 1 and teacher_records(store)[charts[0]["id"]]["status"] == "accepted"


def test_failed_gate_regenerates_with_the_reason(tmp_path, llm, sample_dir):
    cfg, store, charts = ingest(str(tmp_path / "s"), llm, sample_dir, "data.limit=8", "teacher.max_attempts=3")
    fixed, hopeless = charts[0]["title"], charts[1]["title"]
    questions = "1. What is shown in the chart?\n2. Which group is the largest?\n3. Why did it change?"

    def reply(request, key):
        if key == hopeless:
            return questions
        if key == fixed and "previous answer was rejected" not in json.dumps(request):
            return "- **Total:** rose a lot\n- **Trend:** up\n" * 30
        from fake_llm import default_reply
        return default_reply(request, key)

    llm.reply = reply
    assert run_stage(cfg, store, "teacher")
    recs = teacher_records(store)
    ok, bad = recs[charts[0]["id"]], recs[charts[1]["id"]]
    assert ok["status"] == "accepted" and ok["attempts"] == 2 and len(ok["failures"]) == 1
    assert any("markdown" in f for f in ok["failures"][0]) and any("list" in f for f in ok["failures"][0])
    assert bad["status"] == "rejected" and bad["attempts"] == 3 and llm.counts[hopeless] == 3
    assert bad["reason"].startswith("quality gate: asks questions") and bad["reason_code"] == "gate:question_list"
    assert bad["raw_answer"] == questions and bad["essay"] == ""


def test_an_answer_echoing_the_prompt_is_rejected_and_regenerated(tmp_path, llm, sample_dir):
    """A weak teacher copies the prompt's instructions or an example essay instead of writing about the
    chart: a run of 8 words from the template is rejected (gate:prompt_echo) and the chart asked again.
    Quoting the chart's own title is not an echo, and none of the sample's 120 human summaries is one."""
    from fake_llm import default_reply, prompt_text

    from pipeline.prompts import TEACHER_TYPES, teacher_template
    from pipeline.quality import copied_run

    cfg, store, charts = ingest(str(tmp_path / "s"), llm, sample_dir, "data.limit=6", "teacher.max_attempts=2",
                                "teacher.vision=false")
    echo = charts[0]
    instruction = next(line for line in teacher_template(echo["type"]).text.splitlines()
                       if len(line.split()) >= 12 and "{" not in line)

    def reply(request, key):  # every essay quotes its chart's title (default_reply)
        if key == echo["title"] and "previous answer was rejected" not in prompt_text(request):
            return default_reply(request, key) + "\n" + instruction
        return default_reply(request, key)

    llm.reply = reply
    assert run_stage(cfg, store, "teacher")
    recs = teacher_records(store)
    first = recs.pop(echo["id"])
    assert first["status"] == "accepted" and first["attempts"] == 2
    assert [f for f in first["failures"][0] if f.startswith("copies the instructions or an example instead")]
    assert all(r["status"] == "accepted" and r["attempts"] == 1 for r in recs.values()) and len(recs) == len(charts) - 1 >= 2
    summaries = [json.loads(line)["summary"] for line in (sample_dir / "manifest.jsonl").read_text().splitlines()]
    assert len(summaries) == 120
    assert not [s for s in summaries for t in TEACHER_TYPES if copied_run(s, teacher_template(t).text)]


def test_stop_early_ends_a_streamed_echo_at_its_first_copied_line(tmp_path, llm, sample_dir):
    """teacher.stop_early: the answers stream; one whose first paragraph copies an example's sentence is stopped
    there (the server writes a few chunks more at most, not the rest) and rejected as the echo it is, its usage
    estimated from what came; the others stream to their end, pass the whole gate and keep the server's usage.
    A client that read each answer to its end and cut it afterwards fails this, and so does a stop at a finding
    that more text could undo (every answer is too short at first)."""
    from fake_llm import default_reply

    from pipeline.prompts import teacher_template

    cfg, store, charts = ingest(str(tmp_path / "s"), llm, sample_dir, "data.limit=8", "teacher.max_attempts=1",
                                "teacher.vision=false", "teacher.stop_early=true", "teacher.concurrency=1")
    echo = charts[0]
    example = next(line.strip() for line in teacher_template(echo["type"]).text.splitlines()
                   if line.strip().startswith('"The ') and len(line.split()) >= 12)
    replies = {}

    def reply(request, key):
        lines = default_reply(request, key).split("\n")
        if key == echo["title"]:
            lines[1] = example  # step 1 copies the first example's description
        replies[key] = "\n".join(lines)
        return replies[key]

    llm.reply, llm.stream_delay = reply, 0.002
    assert run_stage(cfg, store, "teacher")
    recs = teacher_records(store)
    assert all(r["stream"] for r in llm.requests) and len(llm.streams) == len(charts) >= 3
    for request, (sent, words) in zip(llm.requests, llm.streams):
        chart = next(c for c in charts if c["title"] == llm.key_of(request))
        r, full = recs[chart["id"]], replies[chart["title"]]
        if chart is echo:
            assert r["status"] == "rejected" and r["reason_code"] == "gate:prompt_echo", r
            assert r["finish_reason"] == "abandoned" and sent < words / 3
            assert len(r["raw_answer"]) < len(full) / 3 and r["usage"]["completion_tokens"] == len(r["raw_answer"]) // 4
        else:
            assert r["status"] == "accepted" and r["finish_reason"] == "stop" and sent == words, r
            assert r["essay"] == full.strip() and r["usage"]["completion_tokens"] == len(full) // 4


def test_budget_stops_new_work_and_keeps_finished(tmp_path, llm, sample_dir):
    # each answer costs about $0.01 (completion tokens at $50/Mtok); budget $0.05
    cfg, store, charts = ingest(str(tmp_path / "s"), llm, sample_dir, "data.limit=40", "teacher.concurrency=2",
                                "teacher.price_output_per_mtok=50", "teacher.budget_usd=0.05")
    llm.latency = 0.02
    with pytest.raises(StageError, match=r"budget reached .* charts left without a record"):
        run_stage(cfg, store, "teacher")
    done = teacher_records(store)
    costs = sorted(r["cost_usd"] for r in done.values())
    assert llm.total == len(done) >= 3 and sum(costs) >= 0.05
    assert sum(costs[:-2]) < 0.05  # past the cap, only the 2 requests already in flight were paid for
    assert all(r["status"] == "accepted" for r in done.values())
    assert not store.exists(f"{RUN}/teacher/_SUCCESS")
    before = dict(llm.counts)
    cfg.teacher.budget_usd = 100.0
    assert run_stage(cfg, store, "teacher")
    assert all(llm.counts[t] == 1 for t in before)  # paid-for charts are not requested again
    assert len(teacher_records(store)) == len(charts)


def test_auth_failure_stops_the_stage_without_records(tmp_path, llm, sample_dir):
    cfg, store, _ = ingest(str(tmp_path / "s"), llm, sample_dir, "data.limit=10")
    llm.rule = lambda key, n: "401"
    with pytest.raises(StageError, match="refused the request .*HTTP 401.*MINIMAX_API_KEY"):
        run_stage(cfg, store, "teacher")
    assert teacher_records(store) == {}
    assert KEY not in json.dumps(teacher_records(store))


def test_shards_partition_the_charts(tmp_path, llm, sample_dir):
    cfg, store, charts = ingest(str(tmp_path / "s"), llm, sample_dir, "data.limit=50")
    ids = {c["id"] for c in charts}
    owned = [set(Shard(i, 3).select(ids)) for i in range(3)]
    assert set().union(*owned) == ids and sum(map(len, owned)) == len(ids) and all(owned)
    for i in range(3):
        done = run_stage(cfg, store, "teacher", shard=Shard(i, 3))
        assert done == (i == 2)  # only the last shard to finish completes the stage
        assert set(teacher_records(store)) == set().union(*owned[: i + 1])
    assert llm.total == len(ids) and max(llm.counts.values()) == 1
    assert len(store.get_jsonl(f"{RUN}/teacher/essays.jsonl")) == len(ids)


# --------------------------------------------------------------------------- kill -9 and the key


def _teacher_proc(cfg_path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MINIMAX_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(Path(sys.executable).parent / "ielts-distill"), "-v", "stage", "teacher",
                             "--config", str(cfg_path)], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=env, cwd=REPO, start_new_session=True)


def test_kill9_then_rerun_requests_no_chart_twice(tmp_path, llm, sample_dir):
    store_uri = str(tmp_path / "s")
    cfg, store, charts = ingest(store_uri, llm, sample_dir, "teacher.concurrency=4", "teacher.vision=false")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    llm.latency = 0.1
    first = _teacher_proc(cfg_path, tmp_path / "first.log")
    deadline = time.monotonic() + 60
    while len(teacher_records(store)) < 20:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    at_kill = set(teacher_records(store))
    assert 20 <= len(at_kill) < len(charts)
    counts_at_kill = dict(llm.counts)
    second = _teacher_proc(cfg_path, tmp_path / "second.log")
    assert second.wait(120) == 0, (tmp_path / "second.log").read_text()[-2000:]
    recs = teacher_records(store)
    assert set(recs) == {c["id"] for c in charts}
    title = {c["id"]: c["title"] for c in charts}
    assert all(llm.counts[title[cid]] == 1 for cid in at_kill)  # finished before the kill: never again
    twice = [t for t, n in llm.counts.items() if n > 1]
    # only charts in flight at the kill: requested once, no record yet (<= 4 requests in flight, and up to
    # 2 x concurrency items between their answer and their record)
    assert len(twice) <= 8 and all(counts_at_kill.get(t) == 1 for t in twice)
    # the key was sent to the server, and appears in no log and nowhere in the store
    assert llm.auth == {f"Bearer {KEY}"}
    for log in ("first.log", "second.log"):
        assert KEY not in (tmp_path / log).read_text()
    for path in Path(store_uri).rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_two_teacher_processes_on_one_run_pay_each_chart_once(tmp_path, llm, sample_dir):
    """A lost-but-alive pod and its replacement: two processes on the same run split the charts through
    claims; both end successfully once every chart has its record, and no chart is paid for twice.
    No answer leaves the server before both processes are asking (a 5th request in flight: one process sends at
    most 4), so a slow start of either cannot let the other pay for every chart alone (CI saw that).
    Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 8 s (timeout 600)."""
    store_uri = str(tmp_path / "s")
    cfg, store, charts = ingest(store_uri, llm, sample_dir, "data.limit=40", "teacher.concurrency=4",
                                "teacher.vision=false", "teacher.timeout_s=60")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    llm.latency, llm.hang_s = 0.05, 60.0
    llm.hold_answers_until(4)  # teacher.concurrency: one process alone cannot open it
    procs = [_teacher_proc(cfg_path, tmp_path / f"p{i}.log") for i in range(2)]
    for i, proc in enumerate(procs):
        assert proc.wait(120) == 0, (tmp_path / f"p{i}.log").read_text()[-2000:]
    assert llm.total == len(charts) and max(llm.counts.values()) == 1
    assert set(teacher_records(store)) == {c["id"] for c in charts}
    assert len(store.get_jsonl(f"{RUN}/teacher/essays.jsonl")) == len(charts)
    for i in range(2):  # both paid for a share (neither found the run done and skipped it)
        assert re.search(r"teacher: [1-9]\d* accepted", (tmp_path / f"p{i}.log").read_text()), i
    assert not list(store.list(f"{RUN}/teacher/records/_claims/"))  # every claim released


# --------------------------------------------------------------------------- the client


def _client(llm: FakeLLM, *extra: str) -> LLMClient:
    cfg = load_config(None, [f"teacher.base_url={llm.base_url}", "teacher.timeout_s=1", *extra]).teacher
    return LLMClient(cfg, name="teacher")


def _chat(client: LLMClient, text: str = '<TITLE_LAST>: "x"', stop_when=None):
    async def go():
        try:
            return await client.chat([{"role": "user", "content": text}], stop_when=stop_when)
        finally:
            await client.aclose()
    return asyncio.run(go())


def test_retry_after_is_honoured_and_retries_counted(llm):
    llm.retry_after = 0.8
    llm.script.extend(["429", "500"])
    client = _client(llm)
    started = time.monotonic()
    done = _chat(client)
    assert time.monotonic() - started >= 0.8  # the backoff alone would wait ~0.05 s
    assert done.retries == 2 and client.usage.retries == 2 and client.usage.requests == 3
    assert done.text.startswith("1. <Describe a graph>") and done.prompt_tokens > 0


def test_cost_from_usage_and_think_removed(llm):
    llm.think = True
    client = _client(llm, "teacher.price_input_per_mtok=1000", "teacher.price_output_per_mtok=2000")
    done = _chat(client)
    assert done.cost_usd == pytest.approx((done.prompt_tokens * 1000 + done.completion_tokens * 2000) / 1e6)
    assert client.usage.cost_usd == pytest.approx(done.cost_usd)
    assert "<think>" in done.raw_text and "think" not in done.text.lower()


def test_requests_per_minute_spaces_requests(llm):
    client = _client(llm, "teacher.requests_per_minute=600", "teacher.concurrency=8")  # one per 0.1 s

    async def go():
        try:
            await asyncio.gather(*(client.chat([{"role": "user", "content": f'<TITLE_LAST>: "{i}"'}]) for i in range(6)))
        finally:
            await client.aclose()
    started = time.monotonic()
    asyncio.run(go())
    assert time.monotonic() - started >= 0.45 and llm.total == 6


def test_retries_exhausted_are_transient_a_400_is_final(llm):
    llm.rule = lambda key, n: "garbage"
    client = _client(llm, "teacher.max_retries=2")
    with pytest.raises(TransientLLMError, match="after 3 attempts") as err:
        _chat(client)
    assert llm.total == 3 and not isinstance(err.value, LLMError)  # handlers record LLMError, not this
    llm.rule = lambda key, n: "400"
    with pytest.raises(LLMError, match="HTTP 400"):
        _chat(_client(llm, "teacher.max_retries=2"))
    assert llm.total == 4  # a 400 is not retried


def test_a_streamed_answer_that_breaks_off_is_retried_and_a_silent_one_times_out(llm):
    """chat(stop_when=...) streams: an answer that breaks off halfway, or ends without a finish_reason, is a
    garbage body (retried: the whole answer comes on the next attempt); one that goes silent mid-answer times out
    within teacher.timeout_s per attempt, and the retries are bounded."""
    llm.script.append("cut")
    client = _client(llm)
    done = _chat(client, stop_when=lambda text: False)
    assert done.retries == 1 and done.finish_reason == "stop" and done.text.startswith("1. <Describe a graph>")
    assert done.text.rstrip().endswith('"') and [sent < words for sent, words in llm.streams] == [True, False]
    assert done.completion_tokens == max(1, len(done.raw_text) // 4)  # the server's usage chunk
    llm.rule, llm.hang_s = (lambda key, n: "stall"), 3.0
    client = _client(llm, "teacher.max_retries=1")
    started = time.monotonic()
    with pytest.raises(TransientLLMError, match="after 2 attempts"):
        _chat(client, stop_when=lambda text: False)
    assert time.monotonic() - started < 2 * 1 + 1.5 and client.usage.timeouts == 2


def test_missing_key_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("MINIMAX_API_KEY")
    cfg = load_config(None, ["teacher.base_url=https://api.example.invalid/v1"]).teacher
    with pytest.raises(PipelineError, match="environment variable MINIMAX_API_KEY is not set"):
        LLMClient(cfg, name="teacher")
    LLMClient(load_config(None, ["teacher.base_url=http://127.0.0.1:9/v1"]).teacher)  # local: no key needed


def test_strip_think():
    assert strip_think("<think>a\nb</think>\n\nEssay.") == "Essay."
    assert strip_think("<THINK>x</THINK>A<think>y</think>B") == "AB"
    assert strip_think("reasoning without opener</think>Essay") == "Essay"
    assert strip_think("<think>truncated reasoning") == ""


# --------------------------------------------------------------------------- prompts


def test_prompt_carries_image_or_table(tmp_path, llm, sample_dir):
    from pipeline.prompts import teacher_template
    from pipeline.stages.teacher import build_messages

    cfg, store, charts = ingest(str(tmp_path / "s"), llm, sample_dir)
    assert run_stage(cfg, store, "teacher")
    with_table = next(c for c in charts if c["table"])
    request = next(r for r in llm.requests if llm.key_of(r) == with_table["title"])
    parts = request["messages"][0]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    assert base64.b64decode(url.split(",", 1)[1]) == store.get_bytes(with_table["image"])
    text = next(p["text"] for p in parts if p["type"] == "text")
    assert " | ".join(with_table["table"][1]) in text and text.rstrip().endswith("Follow given structured input:")
    text_only = build_messages(with_table, teacher_template(with_table["type"]), image_url=None)
    assert isinstance(text_only[0]["content"], str) and "data:image" not in text_only[0]["content"]


def test_min_tokens_and_grammar_are_sent_only_when_set(tmp_path, llm, sample_dir):
    cfg, store, _ = ingest(str(tmp_path / "a"), llm, sample_dir, "teacher.min_tokens=150")
    assert run_stage(cfg, store, "teacher")
    assert llm.requests and all(r["min_tokens"] == 150 for r in llm.requests)
    seen = len(llm.requests)
    cfg, store, _ = ingest(str(tmp_path / "b"), llm, sample_dir)
    assert run_stage(cfg, store, "teacher")
    assert len(llm.requests) > seen and all("min_tokens" not in r for r in llm.requests[seen:])
    with pytest.raises(ConfigError, match=r"teacher: .*min_tokens \(512\) must be below max_tokens \(512\)"):
        load_config(None, ["teacher.min_tokens=512"])
    seen = len(llm.requests)
    cfg, store, _ = ingest(str(tmp_path / "c"), llm, sample_dir, "teacher.essay_grammar=true")
    assert run_stage(cfg, store, "teacher")
    assert all(r["grammar"] == ESSAY_GRAMMAR for r in llm.requests[seen:])
    assert all("grammar" not in r for r in llm.requests[:seen])
    with pytest.raises(ConfigError, match=r"teacher: .*essay_grammar .* min_tokens .*: set one of them"):
        load_config(None, ["teacher.min_tokens=150", "teacher.essay_grammar=true"])


# --------------------------------------------------------------------------- the embedded server


@pytest.mark.slow
@pytest.mark.llm
def test_embedded_llama_cpp_teacher(tmp_path, sample_dir):
    """The real thing, kept short: SmolLM2-135M via llama.cpp on 2 charts, configs/local.yaml's gates (without
    its grammar: 48 tokens cannot hold the layout).
    Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 22 s (timeout 600)."""
    import llama_cpp  # noqa: F401  -- make test installs it; missing must fail, not skip
    cfg = load_config(REPO / "configs" / "local.yaml", [
        f"store.uri={tmp_path / 's'}", f"run.id={RUN}", f"data.source={sample_dir}", "data.stride=1", "data.limit=4",
        "teacher.max_tokens=48", "teacher.essay_grammar=false", "teacher.min_tokens=24", "teacher.max_attempts=1",
        "teacher.min_words=1", *BUNDLED_TEACHER])
    store = run_pipeline(cfg, ["ingest", "teacher"])
    recs = teacher_records(store)
    assert len(recs) == len(store.get_jsonl(f"{RUN}/ingest/charts.jsonl")) == 2
    assert all(r["usage"]["completion_tokens"] > 0 for r in recs.values())
    for r in recs.values():  # 48 tokens cut most answers: a cut essay is rejected as such, never accepted
        assert r["finish_reason"] in ("stop", "length", "abandoned")  # abandoned: stop_early saw an echo
        if r["finish_reason"] == "length":
            assert r["status"] == "rejected" and r["reason_code"] == "gate:truncated"
        else:
            assert r["status"] != "accepted" or len(r["essay"].split()) >= 5
    assert store.exists(f"{RUN}/teacher/_SUCCESS")


@pytest.mark.slow
@pytest.mark.llm
def test_min_tokens_lengthens_real_answers(tmp_path, sample_dir):
    """llama.cpp honours teacher.min_tokens: at temperature 0 SmolLM2 ends one of these answers after 89
    tokens; with min_tokens 150 none ends before 150.
    Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 56 s (timeout 600;
    320 s when llama.cpp ran 2 threads on the 2 busy cores)."""
    def tokens(name: str, *extra: str) -> list[int]:
        cfg = load_config(REPO / "configs" / "local.yaml", [
            f"store.uri={tmp_path / name}", f"run.id={RUN}", f"data.source={sample_dir}", "data.limit=4",
            "teacher.max_tokens=200", "teacher.temperature=0", "teacher.max_attempts=1", "teacher.min_words=1",
            "teacher.essay_grammar=false", "teacher.require_structure=false", "teacher.stop_early=false",
            *BUNDLED_TEACHER, *extra])  # whole answers: a stopped one says nothing of where the server would end
        return [r["usage"]["completion_tokens"] for r in teacher_records(run_pipeline(cfg, ["ingest", "teacher"])).values()]

    assert min(tokens("free", "teacher.min_tokens=null")) < 150
    assert len(held := tokens("held", "teacher.min_tokens=150")) == 2 and min(held) >= 150


@pytest.mark.llm
def test_embedded_server_starts_and_stops():
    import urllib.error
    import urllib.request

    import llama_cpp  # noqa: F401  -- make test installs it; missing must fail, not skip

    from pipeline.llm import embedded_server

    cfg = load_config(REPO / "configs" / "local.yaml", BUNDLED_TEACHER).teacher
    with embedded_server(cfg) as live:
        assert live.base_url.startswith("http://127.0.0.1:") and not live.embedded
        with urllib.request.urlopen(f"{live.base_url}/models", timeout=5) as resp:
            assert resp.status == 200
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{live.base_url}/models", timeout=2)


@pytest.mark.llm
def test_embedded_server_stops_writing_an_abandoned_answer():
    """teacher.stop_early pays off only if llama.cpp stops generating when the client closes the stream: an
    answer abandoned after a few words, then a 4-token one, take less than half the time of the 300 tokens
    the first would have written (both under the same load): a server that went on writing the abandoned
    answer would make the short one wait for it."""
    import llama_cpp  # noqa: F401  -- make test installs it; missing must fail, not skip

    from pipeline.llm import embedded_server

    cfg = load_config(REPO / "configs" / "local.yaml", [*BUNDLED_TEACHER, "teacher.essay_grammar=false"]).teacher
    messages = [{"role": "user", "content": "Describe the weather in a long essay."}]
    room = {"temperature": 0.0, "max_tokens": 300, "extra_body": {"min_tokens": 300}}

    async def ask(client, **kwargs):
        started = time.monotonic()
        done = await client.chat(messages, **kwargs)
        return done, time.monotonic() - started

    async def go(live):
        client = LLMClient(live, name="teacher")
        try:
            full, whole = await ask(client, **room)
            cut, first = await ask(client, stop_when=lambda text: len(text.split()) >= 8, **room)
            short, second = await ask(client, temperature=0.0, max_tokens=4)
        finally:
            await client.aclose()
        return full, whole, cut, first + second, short

    with embedded_server(cfg) as live:
        full, whole, cut, abandoned, short = asyncio.run(go(live))
    assert full.completion_tokens == 300 and full.finish_reason == "length"
    assert cut.finish_reason == "abandoned" and len(cut.raw_text.split()) < 30 and short.completion_tokens == 4
    assert abandoned < whole / 2, (abandoned, whole)


def test_prompt_cache_bound_counts_whole_states(monkeypatch):
    """The server's cache bound counts each state's logits copy too (llama-cpp-python counts only its KV), so
    ``embedded_prompt_cache_mb`` bounds the RAM: three states of 100 KB KV + 1 MB logits under a 2.5 MB bound
    keep the last two (counting the KV alone would keep all three)."""
    import numpy as np
    from llama_cpp.llama_cache import LlamaRAMCache

    from pipeline.llm.server import _count_whole_states

    monkeypatch.setattr(LlamaRAMCache, "cache_size", LlamaRAMCache.cache_size)  # restored after the test
    _count_whole_states()
    cache = LlamaRAMCache(capacity_bytes=2_500_000)
    for i in range(3):
        cache[(i, 1, 2)] = types.SimpleNamespace(llama_state_size=100_000, scores=np.zeros(250_000, np.float32),
                                                 input_ids=np.zeros(4, np.intc))
    assert list(cache.cache_state) == [(1, 1, 2), (2, 1, 2)]
    assert 2_000_000 < cache.cache_size <= 2_500_000


@pytest.mark.llm
@pytest.mark.slow
def test_prompt_cache_resumes_a_template_after_a_switch_of_type():
    """teacher.embedded_prompt_cache_mb (512: two states of the 135M): after a line chart's prompt, the next bar
    chart's prompt resumes from the bar template's cached state instead of reading its ~1,100 tokens again.
    One answer token a request, so a request's time is its prompt's reading: with the cache a bar prompt after a line prompt takes a
    fraction of its time without (measured 6x on 2 idle cores; a server that ignored the setting takes the
    same). The faster of two such requests each, so one stall on a busy machine does not decide it."""
    from openai import OpenAI

    from pipeline.llm import embedded_server
    from pipeline.prompts import teacher_template
    from pipeline.stages.teacher import build_messages

    def seconds_after_switch(cache_mb: int) -> float:
        cfg = load_config(REPO / "configs" / "local.yaml", BUNDLED_TEACHER).teacher.model_copy(
            update={"embedded_prompt_cache_mb": cache_mb})
        with embedded_server(cfg) as live:
            client = OpenAI(base_url=live.base_url, api_key="unused", timeout=120, max_retries=0)
            took = []
            for i, kind in enumerate(("bar", "line", "bar", "line", "bar")):
                chart = {"id": f"c{i}", "type": kind, "title": f"Chart {i} of the test",
                         "table": [["Year", "Value"], [str(2000 + i), str(i)]]}
                started = time.perf_counter()
                client.chat.completions.create(model=cfg.model, max_tokens=1, temperature=0, messages=build_messages(
                    chart, teacher_template(kind), image_url=None))
                took.append(time.perf_counter() - started)
            return min(took[2], took[4])

    cached, uncached = seconds_after_switch(512), seconds_after_switch(0)  # 512: both templates' states
    assert cached < 0.5 * uncached, (cached, uncached)


@pytest.mark.llm
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_embedded_server_dies_with_a_killed_stage(tmp_path, sig):
    """kill -9 or SIGTERM of a stage using the embedded server: the server is gone within 5 s (it lived on for
    65-94 s when its parent-death signal was SIGTERM: its web server waited for the dead client's request).
    Measured 6 s each on 2 busy cores."""
    import urllib.error
    import urllib.request

    import llama_cpp  # noqa: F401  -- make test installs it; missing must fail, not skip

    # the stage dies with a long request in flight (the server's web server waits for it on SIGTERM)
    script = ("import json, threading, time, urllib.request\n"
              "from pipeline.config import load_config; from pipeline.llm import embedded_server\n"
              "def ask(url):\n"
              "    body = json.dumps({'model': 'm', 'messages': [{'role': 'user', 'content': 'A long story.'}],\n"
              "                       'max_tokens': 3000, 'min_tokens': 3000}).encode()\n"
              "    urllib.request.urlopen(urllib.request.Request(f'{url}/chat/completions', body,\n"
              "                           {'Content-Type': 'application/json'}), timeout=300)\n"
              f"with embedded_server(load_config('configs/local.yaml', {list(BUNDLED_TEACHER)}).teacher) as live:\n"
              "    threading.Thread(target=ask, args=(live.base_url,), daemon=True).start(); time.sleep(1)\n"
              "    print(live.base_url, flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:")
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 1
    server = Path(f"/proc/{children[0]}/stat")
    proc.send_signal(getattr(signal, sig))  # no finally block of the stage runs
    proc.wait(10)
    deadline = time.monotonic() + 5
    while server.exists() and server.read_text().rsplit(")", 1)[1].split()[0] != "Z":  # gone, or a zombie
        assert time.monotonic() < deadline, "llama.cpp server outlived the killed stage by 5 s"
        time.sleep(0.1)
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # refused, or reset as it went
        urllib.request.urlopen(f"{url}/models", timeout=1)


def test_progress_counts_records(tmp_path, llm, sample_dir):
    from pipeline.stages import teacher

    cfg, store, charts = ingest(str(tmp_path / "s"), llm, sample_dir, "data.limit=10")
    ctx = StageContext(config=cfg, store=store, stage="teacher", shard=Shard(0, 2))
    assert teacher.progress(ctx) == (0, len(charts))
    run_stage(cfg, store, "teacher", shard=Shard(0, 2))
    assert teacher.progress(ctx) == (len(Shard(0, 2).select(c["id"] for c in charts)), len(charts))


@pytest.mark.slow
@pytest.mark.llm
def test_essay_grammar_holds_real_answers_to_the_layout(tmp_path, sample_dir):
    """teacher.essay_grammar reaches llama.cpp: SmolLM2-135M's answers follow the canonical three-step layout
    line by line (its prompt's headers are worded otherwise, so an answer without the grammar does not), in
    plain quoted prose that parses, with no markdown."""
    import llama_cpp  # noqa: F401  -- make test installs it; missing must fail, not skip

    from pipeline.essays import CANONICAL_HEADERS, parse_structured
    from pipeline.quality import failure_modes

    cfg = load_config(REPO / "configs" / "local.yaml", [
        f"store.uri={tmp_path / 's'}", f"run.id={RUN}", f"data.source={sample_dir}", "data.limit=4",
        "teacher.max_tokens=400", "teacher.temperature=0", "teacher.max_attempts=1", "teacher.min_words=1",
        "teacher.max_words=1000", "teacher.essay_grammar=true", "teacher.stop_early=false",  # whole answers
        *BUNDLED_TEACHER])
    recs = teacher_records(run_pipeline(cfg, ["ingest", "teacher"]))
    assert len(recs) == 2
    for r in recs.values():
        lines = r["raw_answer"].split("\n")
        assert lines[0] == CANONICAL_HEADERS[0] and lines[1].startswith('"'), r["raw_answer"]
        assert lines[3:7] == [CANONICAL_HEADERS[1], "", "Paragraph 1:", lines[6]], r["raw_answer"]
        if r["finish_reason"] == "stop":
            essay = parse_structured(r["raw_answer"])
            assert len(essay.paragraphs) in (2, 3) and "markdown" not in failure_modes(r["raw_answer"])
            assert r["raw_answer"].rstrip().split("\n")[-2] == CANONICAL_HEADERS[2]
    assert any(r["finish_reason"] == "stop" for r in recs.values())


@pytest.mark.llm
def test_lazy_grammar_holds_every_answer_and_masks_only_rejected_tokens(monkeypatch):
    """The embedded server's grammar sampler (pipeline.llm.server._lazy_grammar) keeps SmolLM2-135M's answers
    in the grammar's language at temperature 1 while it masks the whole vocabulary only for the tokens the
    grammar rejects, not for every token (llama-cpp-python's own order, which halved the 0.5B's speed)."""
    import re

    from llama_cpp import Llama, LlamaGrammar

    from pipeline.llm import server
    from pipeline.models.smollm import bundled_gguf

    monkeypatch.setattr(Llama, "_init_sampler", Llama._init_sampler)  # restored after the test
    server._lazy_grammar()
    masks, tokens = [], []
    apply = server._LazyGrammarSampler._apply
    monkeypatch.setattr(server._LazyGrammarSampler, "_apply", lambda self, smpl, cells: (
        masks.append(1) if smpl is self._grammar and len(cells) > 1 else None, apply(self, smpl, cells))[1])
    llm = Llama(str(bundled_gguf()), n_ctx=512, n_threads=2, verbose=False)
    grammar = LlamaGrammar.from_string(r'root ::= "\"" [a-zA-Z ,.]+ "\""', verbose=False)
    ask = [{"role": "user", "content": "Give me a markdown list of five numbered facts, with figures and emoji."}]
    for seed in range(4):
        out = llm.create_chat_completion(ask, max_tokens=40, temperature=1.0, seed=seed, grammar=grammar)
        text, used = out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]
        assert re.fullmatch(r'"[a-zA-Z ,.]*"?', text), text
        tokens.append(used)
    assert 0 < len(masks) < sum(tokens) / 2, (len(masks), tokens)
