"""Statistics of pairwise judgements: win rate, Wilson interval, swap consistency, length control.

A *pair* is one chart judged for one comparison "a vs b", once per order (``ab``: a's essay shown first;
``ba``: b's first). Each order's verdict is already mapped back to a model: ``a``, ``b`` or ``invalid``.
The pair's outcome (from a's side):

- both orders name the same model -> ``win`` (a) or ``loss`` (b);
- the orders disagree (the verdict followed the position, not the essay) -> ``tie`` (as MT-Bench does);
- any order ``invalid`` (the judge named neither or both, even after a retry) -> ``invalid``: such a
  pair cannot be checked for position bias, so it is left out of every rate rather than guessed.

``win_rate = (wins + ties/2) / (n - invalid)``, with a Wilson 95 % interval from statsmodels (ties count
as half a success). ``swap_consistency`` is the share of valid pairs whose two orders agree. The
length-controlled win rate follows AlpacaEval's length-controlled form: a logistic (binomial GLM)
regression of the pair's score (1, 1/2, 0) on the bounded term tanh(diff / sd(diff)) of the word-count
difference a - b, read at equal length; "not identifiable" when equal length lies outside the data.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

OUTCOMES = ("win", "loss", "tie", "invalid")
SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}
Z95 = 1.959963984540054


def combine(verdicts: Sequence[str]) -> str:
    """The outcome of one pair from its per-order verdicts (each ``a``, ``b`` or ``invalid``)."""
    if not verdicts:
        raise ValueError("a pair needs at least one verdict")
    bad = [v for v in verdicts if v not in ("a", "b", "invalid")]
    if bad:
        raise ValueError(f"unknown verdict {bad[0]!r} (expected a, b or invalid)")
    if "invalid" in verdicts:
        return "invalid"
    if all(v == "a" for v in verdicts):
        return "win"
    if all(v == "b" for v in verdicts):
        return "loss"
    return "tie"


@dataclass(frozen=True)
class Pair:
    """One chart of one comparison: the per-order verdicts and the two essays' word counts."""

    chart_id: str
    type: str
    verdicts: tuple[str, ...]
    words_a: int | None = None
    words_b: int | None = None

    @property
    def outcome(self) -> str:
        return combine(self.verdicts)

    @property
    def consistent(self) -> bool | None:
        """Both orders agree (None when it cannot be told: one order only, or an invalid verdict)."""
        if len(self.verdicts) < 2 or "invalid" in self.verdicts:
            return None
        return len(set(self.verdicts)) == 1


def wilson(successes: float, nobs: int, alpha: float = 0.05) -> list[float] | None:
    """Wilson score interval (statsmodels); ``successes`` may be fractional (ties count one half)."""
    if nobs <= 0:
        return None
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(successes, nobs, alpha=alpha, method="wilson")
    return [float(max(0.0, low)), float(min(1.0, high))]


def sign_test(wins: int, losses: int) -> float | None:
    """Two-sided exact sign test of wins vs losses (ties carry no direction); None without any."""
    if wins + losses == 0:
        return None
    from scipy.stats import binomtest

    return float(binomtest(wins, wins + losses, 0.5).pvalue)


LC_MIN_OVERLAP = 0.1  # below this share of pairs on the minority side of "equal length": not identifiable


def length_controlled(scores: Sequence[float], length_diff: Sequence[float]) -> dict[str, Any]:
    """Win rate at equal length, in AlpacaEval's form: a binomial GLM of the pair's score (1, 1/2, 0) on a
    bounded length term ``tanh(diff / sd(diff))`` (diff = words a - words b), read at diff = 0.

    Returns ``{win_rate, ci95, length_coef, p_value, longer_share, identifiable, note}``. Equal length must
    lie inside the data: when fewer than ``LC_MIN_OVERLAP`` of the pairs fall on each side of it (one model is
    almost always the longer one) the rate would be extrapolation, so it is None, ``identifiable`` False and
    ``note`` says so. Also None on perfect separation; the raw rate (with a note) when nothing varies.
    """
    out: dict[str, Any] = {"win_rate": None, "ci95": None, "length_coef": None, "p_value": None,
                           "longer_share": None, "identifiable": None, "note": None}
    n = len(scores)
    if n == 0:
        out["note"] = "no valid pairs"
        return out
    longer = (sum(d > 0 for d in length_diff) + sum(d == 0 for d in length_diff) / 2) / n
    out["longer_share"] = longer
    mean = sum(scores) / n
    if len(set(scores)) == 1:
        out.update(win_rate=mean, note="every pair had the same outcome: nothing for length to explain")
        return out
    if len(set(length_diff)) == 1:
        out.update(win_rate=mean, note="no variation in length difference: raw win rate reported")
        return out
    if min(longer, 1 - longer) < LC_MIN_OVERLAP:
        out.update(identifiable=False, note=f"not identifiable: the first model is the longer one in "
                                            f"{100 * longer:.0f} % of the pairs, so the lengths barely overlap and "
                                            "a rate at equal length would be extrapolation")
        return out
    import numpy as np
    import statsmodels.api as sm

    diff = np.asarray(length_diff, dtype=float)
    x = sm.add_constant(np.tanh(diff / diff.std()), has_constant="add")
    y = np.asarray(scores, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # separation / convergence warnings are checked below
        try:
            fit = sm.GLM(y, x, family=sm.families.Binomial()).fit()
            params, bse, pvalues = fit.params, fit.bse, fit.pvalues
        except Exception as exc:  # noqa: BLE001 -- statsmodels raises several types on degenerate designs
            out["note"] = f"regression failed ({exc.__class__.__name__}): not estimable"
            return out
    finite = all(math.isfinite(v) for v in (*params, *bse))
    if not finite or abs(params[0]) > 15 or abs(params[1]) > 15 or bse[0] > 1e3:
        out["note"] = "not estimable: outcomes perfectly separated by length"
        return out
    b0, se0 = float(params[0]), float(bse[0])
    out.update(win_rate=_expit(b0), ci95=[_expit(b0 - Z95 * se0), _expit(b0 + Z95 * se0)],
               length_coef=float(params[1]), p_value=float(pvalues[1]), identifiable=True)
    return out


def _expit(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def summarize(pairs: Iterable[Pair]) -> dict[str, Any]:
    """Counts, win rate, Wilson CI, swap consistency and the length-controlled rate of some pairs."""
    pairs = list(pairs)
    counts = Counter(p.outcome for p in pairs)
    wins, losses, ties, invalid = (counts[o] for o in OUTCOMES)
    valid = len(pairs) - invalid
    win_rate = (wins + ties / 2) / valid if valid else None
    ci95 = wilson(wins + ties / 2, valid)
    checked = [p.consistent for p in pairs if p.consistent is not None]
    usable = [p for p in pairs if p.outcome != "invalid" and p.words_a is not None and p.words_b is not None]
    lc = length_controlled([SCORE[p.outcome] for p in usable], [p.words_a - p.words_b for p in usable])
    return {
        "n": len(pairs), "wins": wins, "losses": losses, "ties": ties, "invalid": invalid,
        "win_rate": win_rate, "ci95": ci95,
        "ci_includes_half": None if ci95 is None else ci95[0] <= 0.5 <= ci95[1],
        "sign_test_p": sign_test(wins, losses),
        "swap_consistency": sum(checked) / len(checked) if checked else None,
        "length_controlled": lc,
    }


def compare(a: str, b: str, pairs: Iterable[Pair]) -> dict[str, Any]:
    """One comparison: the overall summary plus the same per chart type (the types add up to it)."""
    pairs = list(pairs)
    by_type: dict[str, list[Pair]] = {}
    for p in pairs:
        by_type.setdefault(p.type, []).append(p)
    return {"a": a, "b": b, "comparison": f"{a}-vs-{b}", **summarize(pairs),
            "by_type": {t: summarize(ps) for t, ps in sorted(by_type.items())}}


def agreement(x: Sequence[str], y: Sequence[str]) -> dict[str, Any]:
    """How often two judges give a pair the same outcome (win/loss/tie), pairs invalid for either excluded;
    with a Wilson 95 % interval."""
    both = [(p, q) for p, q in zip(x, y) if "invalid" not in (p, q)]
    same = sum(p == q for p, q in both)
    return {"n": len(both), "agree": same, "rate": same / len(both) if both else None,
            "ci95": wilson(same, len(both))}


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean with a 95 % t interval (None with fewer than two values)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "ci95": None}
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half]}


def bootstrap_ci(groups: dict[Any, Sequence[Pair]], reps: int = 2000, seed: int = 0) -> list[float] | None:
    """95 % percentile interval of the pooled win rate over several training seeds: each replicate resamples
    the seeds and the charts (both with replacement) and takes the mean score (1, 1/2, 0) of the valid pairs
    of every resampled (seed, chart), so the interval carries the seeds' variance as well as the charts'.
    ``groups``: seed -> that seed's pairs (one per chart). None without a valid pair."""
    import numpy as np

    keys = sorted(groups, key=str)
    charts = sorted({p.chart_id for ps in groups.values() for p in ps})
    table = np.full((len(keys), len(charts)), np.nan)
    for i, k in enumerate(keys):
        for p in groups[k]:
            if p.outcome != "invalid":
                table[i, charts.index(p.chart_id)] = SCORE[p.outcome]
    if np.isnan(table).all():
        return None
    rng = np.random.default_rng(seed)
    rates = []
    for _ in range(reps):
        rows = table[rng.integers(0, len(keys), len(keys))][:, rng.integers(0, len(charts), len(charts))]
        if not np.isnan(rows).all():
            rates.append(float(np.nanmean(rows)))
    return [float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5))]
