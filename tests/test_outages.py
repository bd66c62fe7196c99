"""Never pay twice, never lose a paid answer: the teacher and the judge under a store outage (SeaweedFS S3
behind a TCP proxy that goes down), an endpoint that goes down, and a server that echoes the key. Paid
requests are counted on the test server (tests/fake_llm.py)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from eval_helpers import seed_run
from fake_llm import FakeLLM
from tcp_proxy import TcpProxy

from pipeline.config import load_config
from pipeline.context import store_for
from pipeline.errors import PipelineError, StageError
from pipeline.executors.local import run_pipeline, run_stage
from pipeline.llm import LLMClient

KEY = "sk-test-7f3a9c1e5b2d4f60"
RUN = "t"
TITLE = r'^<TITLE_LAST>: "(.*)"\s*$'
JUDGE_TITLE = r"ought to compare to:\n\s*(.*?)\n"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch, tmp_path):
    monkeypatch.setattr(LLMClient, "BACKOFF_INITIAL", 0.01)
    monkeypatch.setattr(LLMClient, "BACKOFF_MAX", 0.05)
    monkeypatch.setenv("MINIMAX_API_KEY", KEY)
    monkeypatch.setenv("IELTS_SPILL_DIR", str(tmp_path / "spill"))


@pytest.fixture
def s3_proxy(s3_bucket, monkeypatch):
    """The test's S3 prefix, reached through a TCP proxy that the test can take down."""
    import os

    target = int(os.environ["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1])
    with TcpProxy(target) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        yield s3_bucket, proxy


def outage_when(condition, proxy: TcpProxy, seconds: float | None) -> threading.Thread:
    """Take the proxy down once ``condition()`` holds; bring it back after ``seconds`` (None: never)."""
    def run():
        deadline = time.monotonic() + 120
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        proxy.down()
        if seconds is not None:
            time.sleep(seconds)
            proxy.up()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def teacher_run(store_uri: str, llm: FakeLLM, sample_dir: Path, *extra: str):
    cfg = load_config(None, [f"store.uri={store_uri}", f"run.id={RUN}", f"data.source={sample_dir}",
                             f"teacher.base_url={llm.base_url}", "teacher.timeout_s=2", "teacher.concurrency=4",
                             "teacher.vision=true", "data.limit=30", *extra])
    store = run_pipeline(cfg, ["ingest"])
    return cfg, store, store.get_jsonl(f"{RUN}/ingest/charts.jsonl")


def records_of(store, stage: str, run: str = RUN) -> dict[str, dict]:
    prefix = f"{run}/{stage}/records/"
    return {k[len(prefix):-5]: store.get_json(k) for k in store.list(prefix)
            if k.endswith(".json") and not k[len(prefix):].startswith("_")}


# --------------------------------------------------------------------------- the store goes away


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [1.0, 4.0])
def test_s3_outage_mid_teacher_pauses_and_pays_each_chart_once(s3_proxy, sample_dir, seconds, caplog):
    """S3 blips (1 s) or is down for 4 s mid-run: requests pause, the store is retried, the run completes,
    and every chart was paid for exactly once."""
    uri, proxy = s3_proxy
    with FakeLLM(latency=0.05) as llm:
        cfg, store, charts = teacher_run(uri, llm, sample_dir)
        outage_when(lambda: llm.total >= 10, proxy, seconds)
        assert run_stage(cfg, store, "teacher")
        assert proxy.downs == 1 and llm.total > 10  # the outage came mid-run
    if seconds > 2:  # longer than botocore's own retries: the runner paused and waited
        assert "store unreachable" in caplog.text and "store reachable again" in caplog.text
    assert llm.total == len(charts) and max(llm.counts.values()) == 1
    assert len(records_of(store, "teacher")) == len(charts)
    assert len(store.get_jsonl(f"{RUN}/teacher/essays.jsonl")) == len(charts)


@pytest.mark.slow
def test_s3_down_for_good_stops_spending_and_the_rerun_stores_the_spill(s3_proxy, sample_dir, tmp_path):
    """S3 stays down past store.outage_s: the stage stops with one line before paying for more; answers
    paid for meanwhile wait in the spill file; once S3 is back the rerun stores them and pays only for
    the rest: paid requests = charts."""
    uri, proxy = s3_proxy
    with FakeLLM(latency=0.05) as llm:
        cfg, store, charts = teacher_run(uri, llm, sample_dir, "store.outage_s=1")
        outage_when(lambda: llm.total >= 10, proxy, None)
        with pytest.raises(StageError, match=r"store unreachable for 1 s .*paid answers kept in .*spill"):
            run_stage(cfg, store, "teacher")
        paid = llm.total
        assert paid <= 10 + 2 * 4  # past the outage: only the items already in flight
        assert list((tmp_path / "spill").glob("*.jsonl"))  # paid answers kept on disk
        proxy.up()
        assert run_stage(cfg, store, "teacher")
    assert llm.total == len(charts) and max(llm.counts.values()) == 1  # nothing paid twice
    assert len(records_of(store, "teacher")) == len(charts)
    assert not list((tmp_path / "spill").glob("*.jsonl"))


@pytest.mark.slow
def test_s3_outage_mid_judge_pays_each_request_once(s3_proxy, sample_dir, tmp_path):
    uri, proxy = s3_proxy
    with FakeLLM(latency=0.05, key_pattern=JUDGE_TITLE, reply=lambda r, k: "<FIRST>") as llm:
        config = seed_run(uri, sample_dir, tmp_path, overrides=(
            f"judge.base_url={llm.base_url}", "judge.model=fake-judge", "judge.timeout_s=2", "judge.concurrency=4"))
        store = store_for(config)
        outage_when(lambda: len(llm.requests) >= 8, proxy, 3.0)
        assert run_stage(config, store, "judge")
        assert proxy.downs == 1 and len(llm.requests) > 8
    rows = store.get_jsonl(f"{config.run.id}/judge/verdicts.jsonl")
    # each verdict needs one request at least: as many requests as verdicts = none paid for twice
    assert len(llm.requests) == len(rows) and all(r["verdict"] in ("a", "b") for r in rows)


@pytest.mark.slow
def test_two_judge_processes_on_one_run_pay_each_request_once(tmp_path, sample_dir):
    import subprocess
    import sys

    import yaml

    with FakeLLM(latency=0.05, key_pattern=JUDGE_TITLE, reply=lambda r, k: "<SECOND>") as llm:
        config = seed_run(str(tmp_path / "s"), sample_dir, tmp_path, overrides=(
            f"judge.base_url={llm.base_url}", "judge.model=fake-judge", "judge.concurrency=3"))
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        cli = str(Path(sys.executable).parent / "ielts-distill")
        procs = [subprocess.Popen([cli, "stage", "judge", "--config", str(path)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
    rows = store_for(config).get_jsonl(f"{config.run.id}/judge/verdicts.jsonl")
    # each verdict needs one request at least: as many requests as verdicts = none paid for twice
    assert len(llm.requests) == len(rows) > 0
    assert all(re.search(r"judge: [1-9]\d* [ab]", out) for out in outs), outs  # both did a share


# --------------------------------------------------------------------------- the endpoint goes away


@pytest.mark.slow
def test_endpoint_down_then_up_leaves_no_final_error(tmp_path, sample_dir):
    """The endpoint refuses connections: no chart gets a final 'api error' record; the stage stops with one
    line; once the endpoint is back the rerun completes every chart, each paid once."""
    with FakeLLM() as llm:
        port = llm.port
        cfg, store, charts = teacher_run(str(tmp_path / "s"), llm, sample_dir, "teacher.max_retries=1",
                                         "teacher.concurrency=16")
    with pytest.raises(StageError, match=r"(endpoint .* failing|pending: rerun)"):
        run_stage(cfg, store, "teacher")  # nothing listens on the port now
    assert records_of(store, "teacher") == {}
    back = FakeLLM().start(port)
    try:
        assert run_stage(cfg, store, "teacher")
    finally:
        back.stop()
    recs = records_of(store, "teacher")
    assert len(recs) == len(charts) and all(r["status"] == "accepted" for r in recs.values())
    assert back.total == len(charts) and max(back.counts.values()) == 1


# --------------------------------------------------------------------------- secrets


def test_an_echoed_key_is_in_no_record_or_error(tmp_path, sample_dir, caplog):
    with FakeLLM() as llm:
        cfg, store, charts = teacher_run(str(tmp_path / "s"), llm, sample_dir, "data.limit=6")
        llm.rule = lambda key, n: "echo400" if key == charts[0]["title"] else None
        assert run_stage(cfg, store, "teacher")
        rejected = records_of(store, "teacher")[charts[0]["id"]]
        assert rejected["status"] == "rejected" and "HTTP 400" in rejected["reason"]
        assert "Authorization: ***" in rejected["reason"]  # the server's words, with the key masked
        llm.rule = lambda key, n: "echo401"
        cfg.run.id = "t2"
        run_pipeline(cfg, ["ingest"])
        with pytest.raises(StageError, match="refused the request") as err:
            run_stage(cfg, store, "teacher")
    assert llm.auth == {f"Bearer {KEY}"}  # the key was sent
    assert "Authorization: ***" in str(err.value)
    for text in (str(err.value), caplog.text):
        assert KEY not in text
    for path in (tmp_path / "s").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_credentials_in_urls_are_masked_in_the_stored_config(tmp_path):
    from pipeline.artifacts import save_run_config
    from pipeline.config import dump_config
    from pipeline.redact import redact
    from pipeline.store import LocalStore

    cfg = load_config(None, ["teacher.base_url=https://user:pw-9q8w7e@llm.example/v1?api-key=qs-secret-1&x=1",
                             "judge.base_url=https://llm.example/v1?token=tok-2"])
    save_run_config(cfg, LocalStore(tmp_path))
    text = (tmp_path / "demo" / "config.yaml").read_text()
    assert "https://***@llm.example/v1?api-key=***&x=1" in text and "token=***" in text
    assert not any(s in text for s in ("pw-9q8w7e", "qs-secret-1", "tok-2")) and text == dump_config(cfg)
    assert redact("HTTP 401: invalid header Authorization: Bearer sk-abcdefgh12345") == \
        "HTTP 401: invalid header Authorization: *** ***"
    assert redact(f"key {KEY} leaked") == "key *** leaked"  # MINIMAX_API_KEY's value, wherever it shows up


# --------------------------------------------------------------------------- validate, then purge


def test_force_with_a_missing_key_loses_nothing(tmp_path, sample_dir, monkeypatch):
    """``stage judge --force`` with a changed judge model and the key variable unset: it fails on the key
    before any verdict is touched; with the key back and the old model, the rerun pays for nothing."""
    with FakeLLM(key_pattern=JUDGE_TITLE, reply=lambda r, k: "<FIRST>", host="127.0.0.2") as llm:
        monkeypatch.setenv("JUDGE_KEY", "jk-5f1e2d3c4b")
        config = seed_run(str(tmp_path / "s"), sample_dir, tmp_path, overrides=(
            f"judge.base_url={llm.base_url}", "judge.model=fake-judge", "judge.api_key_env=JUDGE_KEY"))
        store = store_for(config)
        assert run_stage(config, store, "judge")
        paid, before = llm.total, records_of(store, "judge", config.run.id)
        assert paid == len(before) > 0
        monkeypatch.delenv("JUDGE_KEY")
        config.judge.model = "another-judge"
        with pytest.raises(PipelineError, match="judge: environment variable JUDGE_KEY is not set"):
            run_stage(config, store, "judge", force=True)
        assert records_of(store, "judge", config.run.id) == before and llm.total == paid
        assert not list(store.list(f"{config.run.id}/judge/records/_stale/"))
        assert store.exists(f"{config.run.id}/judge/_SUCCESS")  # validated before anything was cleared
        monkeypatch.setenv("JUDGE_KEY", "jk-5f1e2d3c4b")
        config.judge.model = "fake-judge"
        assert run_stage(config, store, "judge") and llm.total == paid  # every verdict was still there
        config.judge.model = "another-judge"  # a real change of judge, but the endpoint fails at once:
        llm.rule = lambda key, n: "500"  # the old verdicts are set aside, then put back (none replaced)
        with pytest.raises(StageError, match="failing .* left without a record|pending: rerun"):
            run_stage(config, store, "judge", force=True)
        assert records_of(store, "judge", config.run.id) == before
        assert not [k for k in store.list(f"{config.run.id}/judge/records/_stale/") if k.endswith(".json")]
        llm.rule, paid = None, llm.total
        assert run_stage(config, store, "judge", force=True) and llm.total == paid + len(before)
    aside = [k for k in store.list(f"{config.run.id}/judge/records/_stale/") if k.endswith(".json")]
    assert len(aside) == len(before)  # moved aside, not deleted


def test_teacher_check_catches_what_would_fail_before_paying(tmp_path, sample_dir, monkeypatch):
    from pipeline.context import StageContext
    from pipeline.stages import teacher

    with FakeLLM(host="127.0.0.2") as llm:
        cfg, store, _ = teacher_run(str(tmp_path / "s"), llm, sample_dir, "data.limit=4")
        ctx = StageContext(cfg, store, "teacher")
        teacher.check(ctx)  # all good
        cfg.teacher.templates = "v9"
        with pytest.raises(PipelineError, match="prompt template not found: pipeline/prompts/teacher/v9/"):
            teacher.check(ctx)
        cfg.teacher.templates = "v1"
        monkeypatch.delenv("MINIMAX_API_KEY")
        with pytest.raises(PipelineError, match="MINIMAX_API_KEY is not set"):
            teacher.check(ctx)
        monkeypatch.setenv("MINIMAX_API_KEY", KEY)
        llm.stop()
        with pytest.raises(PipelineError, match=r"endpoint http://127.0.0.2:\d+/v1 not reachable"):
            teacher.check(ctx)
    assert llm.total == 0
