"""Teacher throughput and resume cost against a latency-injected OpenAI-compatible server (tests/fake_llm.py).

    .venv/bin/python bench/teacher_throughput.py [--items 500] [--latency 0.2] [--concurrency 16]

1. Throughput: the teacher stage over N synthetic charts, each request held ``latency`` seconds by the
   server; ideal = concurrency / latency requests per second. Target: ratio >= 0.9.
2. Resume of a finished stage (``_SUCCESS`` present): target < 2 s and 0 requests.
3. Resume when every record exists but the stage was not marked complete (killed after the last record):
   rebuilds essays.jsonl from the records, 0 requests.
The server runs in its own process so it does not share the client's interpreter lock.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import REPO


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_llm.py"), "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    if not line or line[0] != "PORT":
        proc.kill()
        raise SystemExit("fake LLM server did not start")
    return proc, f"http://127.0.0.1:{line[1]}"


def server_stats(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/_stats", timeout=5) as resp:
        return json.load(resp)


def requests_made(url: str) -> int:
    return server_stats(url)["total"]


def synthetic_charts(n: int) -> list[dict]:
    types = ("bar", "line", "pie", "table")
    return [{"id": f"synthetic-{i:05d}", "type": types[i % 4], "title": f"Synthetic chart number {i}",
             "source": "bench", "source_type": types[i % 4], "image": None, "image_format": "png",
             "width": 1, "height": 1, "table": [["Label", "Value"], ["A", "40"], ["B", "60"]], "ocr_text": None}
            for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if os.environ.get("BENCH_VERBOSE") else logging.WARNING, format="%(asctime)s %(message)s")

    from pipeline.config import dump_config, load_config
    from pipeline.context import StageContext
    from pipeline.executors.local import run_stage
    from pipeline.store import open_store

    os.environ.setdefault("BENCH_LLM_KEY", "bench-key")
    server, url = start_server(args.latency)
    try:
        root = tempfile.mkdtemp(prefix="bench-teacher-")
        cfg = load_config(None, [f"store.uri={root}", "run.id=bench", f"teacher.base_url={url}/v1",
                                 "teacher.api_key_env=BENCH_LLM_KEY", "teacher.vision=false",
                                 f"teacher.concurrency={args.concurrency}", "teacher.max_attempts=1"])
        store = open_store(root)
        ingest = StageContext(config=cfg, store=store, stage="ingest")
        store.put_jsonl(ingest.key("charts.jsonl"), synthetic_charts(args.items))
        ingest.complete({"accepted": args.items})

        started = time.perf_counter()
        run_stage(cfg, store, "teacher")
        seconds = time.perf_counter() - started
        ideal_rate = args.concurrency / args.latency
        stats = server_stats(url)
        made = stats["total"]
        window = stats["last_answer_at"] - stats["first_request_at"]  # first request to last answer
        summary = json.loads(store.get_text("bench/teacher/_SUCCESS"))["summary"]
        ratio = made / window / ideal_rate
        print(f"throughput: {made} requests for {args.items} items ({summary['accepted']} accepted) in {window:.2f}s "
              f"= {made / window:.1f} req/s; ideal {ideal_rate:.1f} req/s; ratio {ratio:.3f} "
              f"(target >= 0.9: {'PASS' if ratio >= 0.9 else 'FAIL'})")
        print(f"whole stage incl. start-up (imports, listing, essays.jsonl, _SUCCESS): {seconds:.2f}s; ratio "
              f"{made / seconds / ideal_rate:.3f}")

        def resume(label: str, fn) -> None:
            started = time.perf_counter()
            fn()
            took, extra = time.perf_counter() - started, requests_made(url) - made
            print(f"resume ({label}): {took:.3f}s, {extra} requests; ratio to the 2 s target {took / 2:.3f} "
                  f"({'PASS' if took < 2 and extra == 0 else 'FAIL'})")

        cfg_file = Path(root) / "bench.yaml"
        cfg_file.write_text(dump_config(cfg))
        cli = [str(Path(sys.executable).parent / "ielts-distill"), "stage", "teacher", "--config", str(cfg_file)]
        resume("stage complete, in process", lambda: run_stage(cfg, store, "teacher"))
        resume("stage complete, `ielts-distill stage teacher` incl. Python start-up",
               lambda: subprocess.run(cli, check=True, capture_output=True))
        store.delete("bench/teacher/_SUCCESS")
        store.delete("bench/teacher/essays.jsonl")
        resume("all records, no _SUCCESS: essays.jsonl rebuilt", lambda: run_stage(cfg, store, "teacher"))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
