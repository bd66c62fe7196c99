"""How often does each judging protocol declare a winner when there is none?

Simulated judges (no LLM): on each pair the judge answers FIRST regardless of the essays with probability
``bias`` (position bias), otherwise it prefers essay a with probability ``p`` — or, for the length-biased
judge, with a probability that grows with a's extra length while the essays are equally good.

- seed protocol: one order (a always FIRST), win rate = share of FIRST, Wilson interval.
- this pipeline: both orders, flips are ties, Wilson interval, and the length-controlled rate.

Reported per scenario over ``SIMS`` simulated test sets of ``N`` charts (the seed judged 272): the mean
win rate and the false-positive rate = share of test sets whose 95 % interval excludes 50 % although the
two models are equally good. Pure statistics: runs in seconds.
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stats import Pair, summarize, wilson

N, SIMS = 272, 300


def position_biased(rng: random.Random, bias: float, p: float):
    def answer(first_is_a: bool, words_a: int, words_b: int) -> str:
        if rng.random() < bias:
            return "a" if first_is_a else "b"
        return "a" if rng.random() < p else "b"
    return answer


def length_biased(rng: random.Random, per_100_words: float):
    def answer(first_is_a: bool, words_a: int, words_b: int) -> str:
        prob_a = 1 / (1 + math.exp(-per_100_words * (words_a - words_b) / 100))
        return "a" if rng.random() < prob_a else "b"
    return answer


def simulate(judge, rng: random.Random, extra_words_a: int) -> tuple[dict, float, list[float] | None]:
    pairs, firsts = [], 0
    for i in range(N):
        wb = int(rng.gauss(150, 30))
        # extra_words_a < 0: a is always 20..-extra words longer (the lengths do not overlap)
        wa = wb + rng.randint(20, -extra_words_a) if extra_words_a < 0 else int(rng.gauss(150 + extra_words_a, 30))
        ab, ba = judge(True, wa, wb), judge(False, wa, wb)
        firsts += ab == "a"
        pairs.append(Pair(str(i), "bar", (ab, ba), wa, wb))
    return summarize(pairs), firsts / N, wilson(firsts, N)


def main() -> None:
    scenarios = [("no difference, position bias 0.3", lambda r: position_biased(r, 0.3, 0.5), 0, True),
                 ("no difference, no bias", lambda r: position_biased(r, 0.0, 0.5), 0, True),
                 ("a better (p=0.7), position bias 0.3", lambda r: position_biased(r, 0.3, 0.7), 0, False),
                 ("no difference, judge likes length, a +40 words", lambda r: length_biased(r, 1.5), 40, True),
                 ("a better (p=0.74), quality-only, a always longer", lambda r: position_biased(r, 0.0, 0.74), -90,
                  False)]
    started = time.perf_counter()
    print(f"{N} charts per test set, {SIMS} test sets per scenario\n")
    print(f"{'scenario':<50} {'seed rate':>9} {'seed FP':>8} {'ours rate':>9} {'ours FP':>8} {'LC rate':>8} "
          f"{'LC FP':>6} {'LC n/id':>7} {'swap cons.':>10}")
    for name, make, extra, null in scenarios:
        rng = random.Random(7)
        judge = make(rng)
        rows = [simulate(judge, rng, extra) for _ in range(SIMS)]
        seed_rate = sum(r[1] for r in rows) / SIMS
        ours_rate = sum(r[0]["win_rate"] for r in rows) / SIMS
        lcs = [r[0]["length_controlled"] for r in rows]
        estimated = [lc["win_rate"] for lc in lcs if lc["win_rate"] is not None]
        lc_rate = sum(estimated) / len(estimated) if estimated else float("nan")
        not_identifiable = sum(lc["identifiable"] is False for lc in lcs) / SIMS
        swap = sum(r[0]["swap_consistency"] for r in rows) / SIMS
        seed_fp = sum(not (r[2][0] <= 0.5 <= r[2][1]) for r in rows) / SIMS
        ours_fp = sum(not r[0]["ci_includes_half"] for r in rows) / SIMS
        lc_fp = sum(lc["ci95"] is not None and not (lc["ci95"][0] <= 0.5 <= lc["ci95"][1]) for lc in lcs) / SIMS
        fp = (lambda v: f"{100 * v:7.1f}%") if null else (lambda v: "    n/a")
        print(f"{name:<50} {100 * seed_rate:8.1f}% {fp(seed_fp):>8} {100 * ours_rate:8.1f}% {fp(ours_fp):>8} "
              f"{100 * lc_rate:7.1f}% {fp(lc_fp):>6} {100 * not_identifiable:6.0f}% {swap:10.2f}")
    print(f"\nFP: share of test sets whose 95 % interval excludes 50 % although the models are equally good "
          f"(should be <= 5 %). LC n/id: share of test sets where the length-controlled rate is not identifiable "
          f"(the lengths barely overlap). {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
