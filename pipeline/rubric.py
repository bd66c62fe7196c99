"""An IELTS Task 1 rubric score per essay from the judge (issue 16, item 7; optional: ``judge.rubric``).

The judge reads the chart's title (and data table when there is one) and one essay, and answers four bands
0-9: Task Achievement, Coherence and Cohesion, Lexical Resource, Grammatical Range and Accuracy
(``pipeline/prompts/judge_rubric_v1.txt``, the public band descriptors paraphrased). An answer without all
four bands is asked once more; then the record is ``invalid`` with the raw text kept. Only worth its cost
with a strong judge: a small model's bands are noise.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

CRITERIA = ("TA", "CC", "LR", "GRA")
NAMES = {"TA": "Task Achievement", "CC": "Coherence and Cohesion", "LR": "Lexical Resource",
         "GRA": "Grammatical Range and Accuracy"}
REMINDER = 'Answer with one line of JSON only: {"TA": <0-9>, "CC": <0-9>, "LR": <0-9>, "GRA": <0-9>}'
RUBRIC = "rubric"  # a rubric record's comparison and order (its verdict: scored | invalid)


@dataclass(frozen=True)
class RubricItem:
    """One rubric request: one model's essay for one chart."""

    model: str
    chart_id: str

    @property
    def id(self) -> str:
        return f"{RUBRIC}/{self.model}/{self.chart_id}"


def build_prompt(template: str, title: str, table: list[list[str]] | None, essay: str) -> str:
    rows = "\n".join(" | ".join(str(c) for c in row) for row in table or [])
    return template.format(title=title, essay=essay, table=f"Its data table:\n{rows}\n" if rows else "")


def parse_bands(text: str) -> dict[str, int] | None:
    """The four bands from the answer (a JSON object, or ``TA: 6`` pairs), each 0-9; None if any is missing."""
    found: dict[str, Any] = {}
    match = re.search(r"\{[^{}]*\}", text or "")
    if match:
        try:
            found = {k.upper(): v for k, v in json.loads(match.group(0)).items()}
        except (ValueError, AttributeError):
            found = {}
    for key in CRITERIA:
        if key not in found:
            pair = re.search(rf"\b{key}\b\W{{0,4}}(\d(?:\.\d)?)", text or "")
            found[key] = pair.group(1) if pair else None
    try:
        bands = {k: float(found[k]) for k in CRITERIA}
    except (TypeError, ValueError):
        return None
    return {k: int(v) for k, v in bands.items()} if all(0 <= v <= 9 and v == int(v) for v in bands.values()) \
        else None


async def score_one(client, item: RubricItem, messages: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """Ask, parse, ask once more with a reminder; the record (verdict ``scored`` with ``bands``, or ``invalid``)."""
    from pipeline.llm import ask_parsed

    answer = await ask_parsed(client, messages, parse_bands, REMINDER, **overrides)
    bands, raw, attempts, reason = answer.parsed, answer.raw, answer.attempts, answer.reason
    usage, cost = answer.usage, answer.cost_usd
    record = {"comparison": RUBRIC, "a": item.model, "b": RUBRIC, "chart_id": item.chart_id, "order": RUBRIC,
              "verdict": "scored" if bands else "invalid", "raw_answer": raw, "attempts": attempts,
              "usage": usage, "cost_usd": round(cost, 8)}
    if bands:
        record["bands"] = bands
    else:
        record["reason"] = reason or "answer without all four bands (TA, CC, LR, GRA, 0-9)"
    return record
