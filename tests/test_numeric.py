"""The entity-aware numeric score (pipeline.quality.DataTable / numeric_scores) measured on the real sample
(/work/shared/data/chart2text-sample): a figure is correct only when tied to its cell by a row or column label
in its sentence or the subject carried from the previous sentence; untied figures are unverifiable."""

from __future__ import annotations

import csv
import json
import random

import pytest

from pipeline.quality import _NUMBER, DataTable, numeric_scores


def sample_tables(sample_dir):
    """(title, rows, human summary) of every sample chart with a CSV table."""
    for line in (sample_dir / "manifest.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("data_format") == "csv_table":
            with (sample_dir / r["data"]).open(encoding="utf-8") as f:
                rows = [[c.strip() for c in row] for row in csv.reader(f) if any(c.strip() for c in row)]
            yield r["title"], rows, r.get("summary") or ""


def _value(m) -> float:
    return float(m.group(1).replace(",", "") + (m.group(2) or ""))


def _numeric_cells(rows):
    return [(i, j, m) for i, row in enumerate(rows[1:], 1) for j, cell in enumerate(row[1:], 1)
            if j < len(rows[0]) and len(found := list(_NUMBER.finditer(cell))) == 1 for m in found]


def planted_sentences(rows, seed: int) -> dict[str, str]:
    """Up to ten sentences "In <column>, <row> stood at <value>." with the true value, the value of the
    named column in a *different* row (wrong row), the value +7 % (at the table's precision; one unit of the
    last digit more where that rounds back) and a random value within the table's range."""
    rng = random.Random(seed)
    cells = _numeric_cells(rows)
    low, high = min(_value(m) for *_, m in cells), max(_value(m) for *_, m in cells)
    out: dict[str, list[str]] = {"true": [], "wrong_row": [], "plus7": [], "random": []}
    for i, j, m in rng.sample(cells, min(10, len(cells))):
        cell, decimals, v = rows[i][j], len(m.group(2) or ".") - 1, _value(m)
        head, tail = cell[:m.start(1)], cell[m.end(2) if m.group(2) else m.end(1):]
        wrong = v * 1.07 if round(v * 1.07, decimals) != round(v, decimals) else v + 10 ** -decimals
        lead = f"In {rows[0][j]}, {rows[i][0]} stood at "
        out["true"].append(lead + cell + ".")
        out["plus7"].append(f"{lead}{head}{wrong:.{decimals}f}{tail}.")
        out["random"].append(f"{lead}{head}{rng.uniform(low, high):.{decimals}f}{tail}.")
        others = [k for k, col, _ in cells if k != i and col == j and rows[k][j] != cell]
        if others:
            out["wrong_row"].append(f"In {rows[0][j]}, {rows[rng.choice(others)][0]} stood at {cell}.")
    return {k: " ".join(v) for k, v in out.items()}


def swapped_summary(summary: str, rows, title: str, rng: random.Random) -> str:
    """The summary with every data figure replaced by another real cell of the same table (its unit kept)."""
    table = DataTable(rows, title)
    cells = [m.group(1) + (m.group(2) or "") for *_, m in _numeric_cells(rows)]

    def swap(m) -> str:
        written = m.group(0).strip()
        if table.match(written, _value(m), 1.0, 0, set(), set(), "").kind == "reference" or len(set(cells)) < 2:
            return m.group(0)
        if _value(m) <= 12 and "." not in written and not m.group(3):
            return m.group(0)  # a count, not data
        number = m.group(1) + (m.group(2) or "")
        other = rng.choice([c for c in cells if c.replace(",", "") != number.replace(",", "")])
        return other + m.group(0)[len(number):]

    return _NUMBER.sub(swap, summary)


def mean(values):
    return sum(values) / len(values)


def test_sentences_that_name_their_rows(sample_dir):
    scores: dict[str, list[float]] = {"true": [], "wrong_row": [], "plus7": [], "random": []}
    for n, (title, rows, _) in enumerate(sample_tables(sample_dir)):
        for kind, essay in planted_sentences(rows, n).items():
            precision = numeric_scores(essay, rows, title)["precision"] if essay else None
            if precision is not None:  # tables of small counts only (bare integers <= 12 are not data)
                scores[kind].append(precision)
    result = {k: (len(v), round(mean(v), 3)) for k, v in scores.items()}
    print("sentences naming their rows (n, mean precision):", result)
    assert result["true"][0] >= 50 and result["wrong_row"][0] >= 30
    assert result["true"][1] >= 0.9
    assert result["wrong_row"][1] <= 0.2 and result["plus7"][1] <= 0.2 and result["random"][1] <= 0.2


def test_human_summaries_against_their_figures_swapped_for_other_cells(sample_dir):
    true, swapped = [], []
    for n, (title, rows, summary) in enumerate(sample_tables(sample_dir)):
        before = numeric_scores(summary, rows, title)["precision"]
        after = numeric_scores(swapped_summary(summary, rows, title, random.Random(n)), rows, title)["precision"]
        if before is not None and after is not None:
            true.append(before)
            swapped.append(after)
    print(f"human summaries: {len(true)} with figures, true {mean(true):.3f}, swapped {mean(swapped):.3f}")
    assert len(true) >= 40
    assert mean(swapped) <= 0.3 * mean(true)


def test_untied_figures_are_unverifiable_and_a_subject_carries_over():
    rows = [["Country", "2018", "2019"], ["Russia", "88", "86"], ["South Africa", "80", "79"], ["Canada", "20", "21"]]
    carried = numeric_scores("Russia produced 86 tons in 2019. It had produced 88 in 2018.", rows)
    assert (carried["correct"], carried["unverifiable"], carried["precision"]) == (2, 0, 1.0)
    wrong = numeric_scores("Russia produced 86 tons in 2019. It had produced 80 in 2018.", rows)
    assert (wrong["correct"], wrong["unmatched"]) == (1, ["80"])  # South Africa's 2018 cell, said of Russia
    untied = numeric_scores("Production peaked at 86 tons.\n\nThe lowest figure was 20 tons.", rows)
    assert (untied["figures"], untied["correct"], untied["unverifiable"]) == (2, 0, 2)
    assert untied["precision"] == 0.0 and untied["tied_precision"] is None and untied["unmatched"] == []
    invented = numeric_scores("Production peaked at 123 tons.", rows)
    assert invented["unverifiable"] == 0 and invented["unmatched"] == ["123"]  # in no cell at all
    # a new paragraph starts without a subject
    assert numeric_scores("Russia produced 86 in 2019.\n\nIt had produced 88.", rows)["unverifiable"] == 1


@pytest.mark.parametrize("sentence, correct", [
    ("In 2019 Russia produced 65 tons more than Canada.", 1),  # 86 - 21: two tied cells
    ("In 2019 one country produced 65 tons more than another.", 0),  # the same figure, tied to no row
    ("Canada produced 55 tons less than South Africa in 2018.", 0),  # 80 - 20 = 60, not 55
])
def test_derived_quantities_need_tied_cells(sentence, correct):
    rows = [["Country", "2018", "2019"], ["Russia", "88", "86"], ["South Africa", "80", "79"], ["Canada", "20", "21"]]
    assert numeric_scores(sentence, rows)["correct"] == correct


def test_score_cli_reports_unverifiable_figures(sample_dir, tmp_path):
    """``ielts-distill score`` prints the entity-aware numbers: a figure its sentence ties to no row is
    unverifiable (not correct), one tied to the wrong row is wrong."""
    from click.testing import CliRunner

    from pipeline.cli import main

    csv_path = sample_dir / "data" / "statista-multi_col-284.csv"  # palladium production by country
    rows = list(csv.reader(csv_path.open(encoding="utf-8")))
    essay = tmp_path / "essay.txt"
    essay.write_text(f"Russia produced {rows[1][-1]} metric tons in 2019. The largest producer made "
                     f"{rows[1][-1]} tons.\n\nSouth Africa produced {rows[1][-1]} tons in 2019.", encoding="utf-8")
    result = CliRunner().invoke(main, ["score", str(essay), "--chart-data", str(csv_path)])
    assert result.exit_code == 0, result.output
    numeric = json.loads(result.output)["numeric"]
    # 1: Russia's own cell; 2: carried subject (Russia) -> correct; 3: Russia's figure said of South Africa
    assert (numeric["figures"], numeric["correct"], numeric["unverifiable"]) == (3, 2, 0)
    assert numeric["unmatched"] == [rows[1][-1]] and numeric["precision"] == pytest.approx(2 / 3)
    essay.write_text(f"The largest producer made {rows[1][-1]} tons in one year.", encoding="utf-8")
    numeric = json.loads(CliRunner().invoke(main, ["score", str(essay), "--chart-data", str(csv_path)]).output)["numeric"]
    assert (numeric["figures"], numeric["correct"], numeric["unverifiable"], numeric["precision"]) == (1, 0, 1, 0.0)
