"""Teacher throughput against a bare asyncio + openai loop, and resume cost, on the real sample charts.

    .venv/bin/python bench/teacher_throughput.py [--items 300] [--latency 0.2] [--concurrency 16 64]
                                                 [--fault-rates 0 0.1] [--repeat 1] [--no-resume]

The default path: the ingest stage reads the bundled sample (tests' ``chart2text-sample``; images, tables and
OCR text as ingest gives them), its charts are repeated under distinct ids up to ``--items``, and the teacher
stage (vision on, default gates) runs against tests/fake_llm.py in its own process (so it does not share the
client's interpreter lock), each request held ``--latency`` seconds. In the same run and against the same
server, a bare loop (asyncio + openai.AsyncOpenAI + a semaphore, the same messages with the image data URL
built beforehand, the same retry rule as the stage's client, a 429's wait shared by all requests) sends one request per chart. Faults: a share
``--fault-rates`` of the requests answer 429 (Retry-After) or 500 (no Retry-After), alternately.

One line per figure: requests per second of the stage and of the bare loop over the server's window (first
request to last answer) and the ratio stage/bare (target >= 0.95), and the whole stage's time (start-up,
listing, essays.jsonl and _SUCCESS included) with its ratio to the bare loop's whole time, and the client
process's CPU time per request (all threads) with the ratio stage/bare (target <= 1.3). ``--repeat N``: N pairs
(bare loop, then stage) per setting and a line with their median and range; the machines are shared, a single
pair says little. Then resume: a finished stage (``_SUCCESS``) and a stage whose records all exist without
``_SUCCESS``: target < 2 s and 0 requests.

Idle 2-core CPU without AMX, 2026-12-07, medians of 3 pairs: at 64, rate ratio 1.051 and 1.046 (two runs), CPU
per request 1.07x and 1.22x; at 16, 1.016 and 1.07x. Earlier (beside other jobs, load average 2.8-4.8: upper bounds; each a
median of 3 pairs, 4 runs; docs/teacher.md has every run): concurrency 64 without faults, rate ratio
0.720-1.077 and CPU per request 4.4-7.4 ms against the bare loop's 3.6-4.3 ms (1.02-1.60x); concurrency 16,
1.003-1.042 and 5.2-7.8 against 4.7-4.8 ms (1.10-1.69x). Main before issue 24's item 8, in the same session:
0.49-0.67 and 1.79-2.21x at 64, 0.85-0.95 and 1.94-2.01x at 16.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import REPO, SAMPLE

TARGET = 0.95  # stage/bare requests per second
CPU_TARGET = 1.3  # stage/bare client CPU per request


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_llm.py"), "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    if not line or line[0] != "PORT":
        proc.kill()
        raise SystemExit("fake LLM server did not start")
    return proc, f"http://127.0.0.1:{line[1]}"


def server_call(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}{path}", data=data), timeout=10) as resp:
        return json.load(resp)


def window(stats: dict) -> float:
    return stats["last_answer_at"] - stats["first_request_at"]  # first request to last answer


def repeated(charts: list[dict], n: int) -> list[dict]:
    """``n`` charts: the sample's, cycled, each copy under its own id (the image is the same stored key)."""
    return [{**charts[i % len(charts)], "id": f"{charts[i % len(charts)]['id']}-r{i // len(charts)}"}
            for i in range(n)]


def bare_loop(cfg, charts: list[dict], store) -> tuple[float, float]:
    """One request per chart with asyncio + openai only; returns the wall time. The messages (with the
    image data URL) are built before the clock starts; retries follow the stage client's rule. Returns
    (wall, CPU) seconds of this process."""
    from openai import APIStatusError, AsyncOpenAI

    from pipeline.llm import image_data_url
    from pipeline.llm.client import LLMClient, _retry_after
    from pipeline.prompts import teacher_template
    from pipeline.stages.teacher import build_messages

    t = cfg.teacher
    images = {c["image"]: image_data_url(store.get_bytes(c["image"]), c.get("image_format")) for c in charts
              if t.vision}
    messages = [build_messages(c, teacher_template(c["type"], t.templates), image_url=images.get(c["image"]))
                for c in charts]

    async def run() -> None:
        client = AsyncOpenAI(api_key="bench", base_url=t.base_url, timeout=t.timeout_s, max_retries=0)
        sem = asyncio.Semaphore(t.concurrency)
        not_before = 0.0  # the shared back-off after a 429, as in the client

        async def one(msgs) -> None:
            nonlocal not_before
            for attempt in range(t.max_retries + 1):
                try:
                    async with sem:
                        while (left := not_before - time.monotonic()) > 0:
                            await asyncio.sleep(left)
                        await client.chat.completions.create(model=t.model, messages=msgs, temperature=t.temperature,
                                                             max_tokens=t.max_tokens, n=1)
                    return
                except APIStatusError as exc:
                    if attempt == t.max_retries:
                        raise
                    after = _retry_after(exc)
                    if after is not None:
                        wait = after * (1 + random.random() * 0.1)
                    else:  # tenacity's wait_exponential_jitter, as the client uses it
                        initial = LLMClient.BACKOFF_INITIAL
                        wait = min(initial * 2 ** attempt + random.uniform(0, initial), LLMClient.BACKOFF_MAX)
                    if after is not None or exc.status_code == 429:
                        not_before = max(not_before, time.monotonic() + wait)
                    await asyncio.sleep(wait)

        await asyncio.gather(*(one(m) for m in messages))
        await client.close()

    started, cpu = time.perf_counter(), time.process_time()
    asyncio.run(run())
    return time.perf_counter() - started, time.process_time() - cpu


def measure_pair(cfg, charts: list[dict], store, url: str, latency: float, rate: float) -> dict:
    """The bare loop, then the teacher stage, on the same server; prints the pair's line and returns its figures."""
    from pipeline.context import StageContext
    from pipeline.executors.local import run_stage

    run_id, conc = cfg.run.id, cfg.teacher.concurrency
    ingest = StageContext(config=cfg, store=store, stage="ingest")
    store.put_jsonl(ingest.key("charts.jsonl"), charts)
    ingest.complete({"accepted": len(charts)})

    server_call(url, "/_reset", {})
    bare_s, bare_cpu = bare_loop(cfg, charts, store)
    bare = server_call(url, "/_stats")
    server_call(url, "/_reset", {})
    started, cpu, wall0 = time.perf_counter(), time.process_time(), time.time()
    run_stage(cfg, store, "teacher")
    stage_s, stage_cpu = time.perf_counter() - started, time.process_time() - cpu
    stage = server_call(url, "/_stats")
    summary = json.loads(store.get_text(f"{run_id}/teacher/_SUCCESS"))["summary"]
    s_rate, b_rate = stage["total"] / window(stage), bare["total"] / window(bare)
    ratio = s_rate / b_rate
    ideal = conc / latency
    s_ms, b_ms = stage_cpu / stage["total"] * 1e3, bare_cpu / bare["total"] * 1e3
    print(f"concurrency {conc}, faults {rate:.0%}: stage {s_rate:.1f} req/s ({stage['total']} requests, "
          f"{summary['accepted']} accepted, window {window(stage):.2f}s), bare {b_rate:.1f} req/s "
          f"({bare['total']} requests, window {window(bare):.2f}s); ratio stage/bare {ratio:.3f} "
          f"(target >= {TARGET}: {'PASS' if ratio >= TARGET else 'FAIL'}); ideal {ideal:.0f} req/s: "
          f"stage {s_rate / ideal:.2f}, bare {b_rate / ideal:.2f}; whole stage {stage_s:.2f}s "
          f"({stage['total'] / stage_s:.1f} req/s; {stage['first_request_at'] - wall0:.2f}s before the "
          f"first request, {wall0 + stage_s - stage['last_answer_at']:.2f}s after the last answer), bare loop "
          f"{bare_s:.2f}s: whole ratio {(stage['total'] / stage_s) / (bare['total'] / bare_s):.3f}; client CPU per "
          f"request: stage {s_ms:.2f} ms, bare {b_ms:.2f} ms (ratio {s_ms / b_ms:.2f}, target <= {CPU_TARGET})",
          flush=True)
    return {"ratio": ratio, "stage_ms": s_ms, "bare_ms": b_ms}


def median_line(conc: int, rate: float, pairs: list[dict]) -> str:
    """The median of the pairs' figures (each pair ran its bare loop and its stage back to back)."""
    def med(key):
        return statistics.median(p[key] for p in pairs)

    ratio, cpu = med("ratio"), statistics.median(p["stage_ms"] / p["bare_ms"] for p in pairs)
    return (f"concurrency {conc}, faults {rate:.0%}, median of {len(pairs)} pairs: ratio stage/bare {ratio:.3f} "
            f"(range {min(p['ratio'] for p in pairs):.3f}-{max(p['ratio'] for p in pairs):.3f}; target >= {TARGET}: "
            f"{'PASS' if ratio >= TARGET else 'FAIL'}); client CPU per request: stage {med('stage_ms'):.2f} ms, bare "
            f"{med('bare_ms'):.2f} ms, ratio {cpu:.2f} (range {min(p['stage_ms'] / p['bare_ms'] for p in pairs):.2f}-"
            f"{max(p['stage_ms'] / p['bare_ms'] for p in pairs):.2f}; target <= {CPU_TARGET}: "
            f"{'PASS' if cpu <= CPU_TARGET else 'FAIL'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=300, help="requests per run (the sample's charts, repeated)")
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--fault-rates", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--retry-after", type=float, default=0.05, help="Retry-After of the fake 429s (s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="pairs (bare loop, then stage) per setting; more than one: also their median")
    parser.add_argument("--no-resume", action="store_true", help="skip the resume checks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if os.environ.get("BENCH_VERBOSE") else logging.WARNING,
                        format="%(asctime)s %(message)s")

    from pipeline.config import dump_config, load_config
    from pipeline.executors.local import run_stage
    from pipeline.store import open_store

    os.environ.setdefault("BENCH_LLM_KEY", "bench-key")
    server, url = start_server(args.latency)
    root = tempfile.mkdtemp(prefix="bench-teacher-")
    store = open_store(root)

    def config(run_id: str, concurrency: int):
        return load_config(None, [f"store.uri={root}", f"run.id={run_id}", f"data.source={SAMPLE}",
                                  f"teacher.base_url={url}/v1", "teacher.api_key_env=BENCH_LLM_KEY",
                                  "teacher.vision=true", f"teacher.concurrency={concurrency}"])

    try:
        run_stage(config("sample", 1), store, "ingest")
        sample = store.get_jsonl("sample/ingest/charts.jsonl")
        charts = repeated(sample, args.items)
        kib = sum(len(store.get_bytes(c["image"])) for c in sample) / len(sample) / 1024
        print(f"charts: {len(sample)} from {SAMPLE} (images {kib:.0f} KiB on average, "
              f"{sum(1 for c in sample if c.get('table'))} with a table, "
              f"{sum(1 for c in sample if c.get('ocr_text'))} with OCR text), repeated to {len(charts)}; "
              f"latency {args.latency}s")
        last = None
        for rate in args.fault_rates:
            server_call(url, "/_config", {"fault_rate": rate, "faults": ["429", "500"],
                                          "retry_after": args.retry_after})
            for conc in args.concurrency:
                pairs = []
                for rep in range(args.repeat):
                    last = config(f"c{conc}-f{int(rate * 100)}" + (f"-{rep}" if rep else ""), conc)
                    pairs.append(measure_pair(last, charts, store, url, args.latency, rate))
                if len(pairs) > 1:
                    print(median_line(conc, rate, pairs))
        if args.no_resume or last is None:
            return
        made = server_call(url, "/_stats")["total"]
        run_id = last.run.id

        def resume(label: str, fn) -> None:
            started = time.perf_counter()
            fn()
            took, extra = time.perf_counter() - started, server_call(url, "/_stats")["total"] - made
            print(f"resume ({label}): {took:.3f}s, {extra} requests; ratio to the 2 s target {took / 2:.3f} "
                  f"({'PASS' if took < 2 and extra == 0 else 'FAIL'})")

        cfg_file = Path(root) / "bench.yaml"
        cfg_file.write_text(dump_config(last))
        cli = [str(Path(sys.executable).parent / "ielts-distill"), "stage", "teacher", "--config", str(cfg_file)]
        resume("stage complete, in process", lambda: run_stage(last, store, "teacher"))
        resume("stage complete, `ielts-distill stage teacher` incl. Python start-up",
               lambda: subprocess.run(cli, check=True, capture_output=True))
        store.delete(f"{run_id}/teacher/_SUCCESS")
        store.delete(f"{run_id}/teacher/essays.jsonl")
        resume("all records, no _SUCCESS: essays.jsonl rebuilt", lambda: run_stage(last, store, "teacher"))
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
