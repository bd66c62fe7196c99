"""Quality gates and failure-mode detectors on crafted essays (pipeline.quality)."""

from __future__ import annotations

import pytest

from pipeline.config import TeacherSection
from pipeline.quality import (
    MODES,
    DataTable,
    failure_modes,
    gate,
    invented_numbers,
    numbers_in,
    numbers_in_table,
    numeric_faithfulness,
    numeric_scores,
)

TABLE = [["Source", "1995", "2005"], ["Coal", "29.80%", "30.9%"], ["Gas", "29.63%", "30.1%"],
         ["Nuclear", "6.40%", "10.10%"], ["Petrol", "29.27%", "19.55%"], ["Shipments (TEU)", "4751653", "5,020,114"]]

GOOD = '''1. <Describe a graph>:
"The table compares the proportion of energy that France produced from four sources in 1995 and 2005, together
with the volume of container shipments handled in each of those years."

2. <Find the key points, trends and compare data>:

Paragraph 1:
"Coal remained the leading source, its share edging up from 29.8% to 30.9%, while gas followed an almost
identical path, rising marginally from 29.63% to roughly 30%. Nuclear power grew far more markedly, climbing by
3.7 percentage points to 10.1% by the end of the decade."

Paragraph 2:
"Petrol, by contrast, was the only source to lose ground, falling from about 29% of total output to just 19.55%.
Meanwhile, shipments rose from 4,751,653 containers in 1995 to around 5.02 million a decade later, a notable
expansion of trade."

3. <Write a summary of presented data>:
"Overall, coal and gas dominated production in both years, nuclear energy expanded considerably, and petrol was
the sole source to decline over the period."'''

LISTED = '''The chart shows energy sources in France.

- Coal: 29.8% in 1995
- Gas: 29.63% in 1995
- Petrol fell to 19.55%'''

MARKDOWN = '''## Energy production in France

The chart shows **coal** and gas shares. Coal was the largest source in both years, at 29.8% and 30.9%.

Overall, petrol declined while nuclear energy grew.'''

QUESTIONS = '''1. What is the percentage of foreign-born population in the U.S. in 1840?
2. What is the percentage of foreign-born population in the U.S. in 1920?
3. What is the percentage of foreign-born population in the U.S. in 2000?'''

PROSE = GOOD.replace('1. <Describe a graph>:\n', "").replace("2. <Find the key points, trends and compare data>:\n\n", "") \
    .replace("Paragraph 1:\n", "").replace("Paragraph 2:\n", "").replace("3. <Write a summary of presented data>:\n", "") \
    .replace('"', "")


@pytest.fixture
def cfg() -> TeacherSection:
    return TeacherSection()


def test_good_essay_passes_every_gate(cfg):
    assert gate(GOOD, TABLE, cfg) == []
    assert failure_modes(GOOD, variant="structured", table_rows=TABLE) == []
    assert numeric_faithfulness(GOOD, TABLE) == 1.0


def test_formatting_and_rounding_tolerance():
    # 4,751,653 vs 4751653; 29.8% vs 29.80%; "about 29" for 29.27; "roughly 30" for 30.1; "5.02 million" for
    # 5,020,114; "3.7 points" = 10.10 - 6.40; years from the header row
    assert invented_numbers(GOOD, TABLE) == []
    assert invented_numbers("Coal reached 31.5% and shipments 4.9 million.", TABLE) == ["31.5%", "4.9 million"]
    assert invented_numbers("a gap of 1995 points", TABLE) == []  # header years are table values too


def test_invented_number_is_named(cfg):
    essay = GOOD.replace("just 19.55%", "just 57%")
    reasons = gate(essay, TABLE, cfg)
    assert reasons == ["numbers not in the data table: 57%"]
    assert "invented_numbers" in failure_modes(essay, variant="structured", table_rows=TABLE)
    # ten data figures (29.8%, 30.9%, 29.63%, 30%, 3.7, 10.1%, 29%, 57%, 4,751,653, 5.02 million); the years
    # 1995 and 2005 are the header's, references rather than data
    assert numeric_faithfulness(essay, TABLE) == pytest.approx(0.9)


def test_numbers_skipped_without_a_table_or_when_disabled(cfg):
    essay = GOOD.replace("just 19.55%", "just 57%")
    assert numeric_faithfulness(essay, None) is None and invented_numbers(essay, []) is None
    assert gate(essay, None, cfg) == []
    assert gate(essay, TABLE, cfg.model_copy(update={"check_numbers": False})) == []


def test_list_is_rejected(cfg):
    assert "bullets" in failure_modes(LISTED)
    assert any("list (3 bulleted" in r for r in gate(LISTED, TABLE, cfg))


def test_markdown_is_rejected(cfg):
    assert "markdown" in failure_modes(MARKDOWN)
    assert any(r.startswith("uses markdown") for r in gate(MARKDOWN, TABLE, cfg))
    assert "markdown" not in failure_modes(GOOD.replace("Paragraph 1:", "**Paragraph 1:**"), variant="structured")


def test_questions_instead_of_an_essay(cfg):
    modes = failure_modes(QUESTIONS)
    assert "question_list" in modes and "bullets" in modes
    assert gate(QUESTIONS, None, cfg)[0].startswith("asks questions instead of describing the chart")
    assert "question_list" not in failure_modes(GOOD + "\nWhy did petrol decline? Prices rose sharply then.")


def test_word_limits(cfg):
    long_essay = GOOD.replace("a notable\nexpansion of trade.", "a notable expansion of trade. " + "Indeed, " * 60)
    assert "too_long" in failure_modes(long_essay, variant="structured")
    assert any(r.startswith("too long: ") and "(max 190)" in r for r in gate(long_essay, TABLE, cfg))
    assert failure_modes(GOOD, max_words=100) == ["too_long"]
    assert failure_modes(GOOD, min_words=300) == ["too_short"]
    relaxed = cfg.model_copy(update={"min_words": 10, "max_words": 400})
    assert gate(long_essay, TABLE, relaxed) == []


def test_structure_required_or_not(cfg):
    reasons = gate(PROSE, TABLE, cfg)
    assert len(reasons) == 1 and reasons[0].startswith("three-step structure not found: no step headers")
    assert gate(PROSE, TABLE, cfg.model_copy(update={"require_structure": False})) == []
    assert gate("", TABLE, cfg) == ["empty answer"]


def test_variants():
    assert failure_modes(PROSE, variant="unstructured") == []
    assert failure_modes(GOOD, variant="unstructured") == ["structure_markers"]
    assert failure_modes(GOOD, variant="structured") == []
    assert failure_modes(PROSE, variant="structured") == ["missing_paragraphs"]
    one_block = " ".join(PROSE.split())
    assert failure_modes(one_block, variant="unstructured") == ["missing_paragraphs"]
    assert set(failure_modes(QUESTIONS + "\n\n" + MARKDOWN, variant="structured")) <= set(MODES)


def test_numbers_in_and_table_numbers():
    assert numbers_in("Sales hit 4,751,653 units, 29.8% of 1,200.5 in 2019 across 3 ports.") == \
        [4751653.0, 29.8, 1200.5, 2019.0]  # 3 (a count) is not data
    assert numbers_in(GOOD)[:2] == [1995.0, 2005.0]  # markers ("1. <Describe...>", "Paragraph 1:") excluded
    assert numbers_in_table([["Year", "Share in %"], ["2019*", "$12.5bn"], ["2020", "1,234"]]) == \
        [12.5, 1234.0, 2019.0, 2020.0]


def test_seed_failure_example_is_caught(cfg):
    """The seed's 'alternative formatting' failure: bold headings and bullets instead of the structure."""
    essay = ("The line chart illustrates the trend of removals of unauthorized immigrants.\n\n"
             "**Removals of unauthorized immigrants:**\n\n"
             "- **Total:** The total number of removals has increased from 188,467 in 2000 to 337,287 in 2018.\n"
             "- **Increase:** The number of removals has risen steadily from 2000 to 2018.\n\n"
             "**Conclusion:**\n\nOverall, the data shows a consistent upward trend.")
    modes = failure_modes(essay, variant="structured")
    assert {"markdown", "bullets", "missing_paragraphs", "too_short"} <= set(modes)
    assert len(gate(essay, None, cfg)) == len(modes)  # the gate and the detectors agree


# --------------------------------------------------------------------------- numeric faithfulness

ENERGY = "Energy production by source in France, 1995 and 2005 (in million tonnes)"


def test_figures_align_with_the_row_they_are_said_about():
    # 29.63 is gas's 1995 value: right about gas, wrong about petrol (a value of another row never matches)
    assert numeric_scores("Gas stood at 29.63% in 1995.", TABLE)["precision"] == 1.0
    assert numeric_scores("Petrol stood at 29.63% in 1995.", TABLE)["unmatched"] == ["29.63%"]
    # a named row with its year left implicit ("a decade later") is still that row's value
    assert numeric_scores("Shipments were 4,751,653 in 1995 and about 5.02 million a decade later.",
                          TABLE)["precision"] == 1.0
    # no row or column named: some cell has it, but which one cannot be told (tests/test_numeric.py)
    untied = numeric_scores("One source reached 19.55%.", TABLE)
    assert (untied["precision"], untied["unverifiable"], untied["unmatched"]) == (0.0, 1, [])


def test_rounding_follows_the_digits_written_and_the_table_unit():
    assert invented_numbers("Coal reached 31% in 2005.", TABLE) == []  # "31" stands for 30.5..31.5: 30.9
    assert invented_numbers("Coal reached 32% in 2005.", TABLE) == ["32%"]
    assert invented_numbers("Coal reached 30.0% in 2005.", TABLE) == ["30.0%"]  # neither 29.80 nor 30.9
    celgene = [["Drug", "2013", "2018"], ["Revlimid", "4280.3", "9685"], ["Otezla", "-", "1608"]]
    title = "Revenues of Celgene's top products from 2013 to 2018 (in million U.S. dollars)"
    assert numeric_scores("Otezla earned about 1.6 billion dollars in 2018.", celgene, title)["precision"] == 1.0
    assert numeric_scores("Otezla earned 1,608 million dollars in 2018.", celgene, title)["precision"] == 1.0
    assert numeric_scores("Otezla earned 1.7 billion dollars in 2018.", celgene, title)["precision"] == 0.0
    # 2013 and 2018 are the header's (and the title's): references, counted neither way
    assert numeric_scores("Between 2013 and 2018 sales changed.", celgene, title)["figures"] == 0


def test_differences_changes_and_ratios_near_a_change_word():
    assert invented_numbers("Nuclear rose by 3.7 points.", TABLE) == []  # 10.10 - 6.40
    assert invented_numbers("Nuclear went 3.7 in one go.", TABLE) == ["3.7"]  # no change word: not a difference
    assert invented_numbers("One source rose by 3.7 points.", TABLE) == ["3.7"]  # no row named: no derived match
    assert invented_numbers("Nuclear power grew by 58% between 1995 and 2005.", TABLE) == []  # 10.1/6.4 - 1
    assert invented_numbers("Nuclear power grew by 68% between 1995 and 2005.", TABLE) == ["68%"]
    revlimid = [["Drug", "2013", "2018"], ["Revlimid", "4280.3", "9685"]]
    assert invented_numbers("Revlimid sales grew 2.3 times over the period.", revlimid) == []
    assert invented_numbers("Revlimid sales grew 3.3 times over the period.", revlimid) == ["3.3"]


def test_coverage_counts_the_key_cells_mentioned():
    table = [["Year", "Sales"], ["2015", "10.5"], ["2016", "14.2"], ["2017", "9.1"], ["2018", "12.7"]]
    assert DataTable(table).key_cells() == {(1, 1), (2, 1), (3, 1), (4, 1)}  # first, max, min, last
    scores = numeric_scores("Sales began at 10.5 in 2015 and peaked at 14.2 in 2016.", table)
    assert (scores["precision"], scores["covered"], scores["key_cells"], scores["coverage"]) == (1.0, 2, 4, 0.5)
    assert numeric_scores("No figures here at all.", table)["precision"] is None


# -------- calibration on the sample's real tables and human summaries: tests/test_numeric.py


def test_score_cli_on_a_sample_chart(sample_dir, tmp_path):
    """``ielts-distill score`` on a real chart's CSV: the same numbers as numeric_scores, as JSON."""
    import csv
    import json

    from click.testing import CliRunner

    from pipeline.cli import main

    csv_path = sample_dir / "data" / "statista-multi_col-284.csv"  # palladium production by country
    rows = list(csv.reader(csv_path.open(encoding="utf-8")))
    assert rows[1][0] == "Russia" and rows[0][-1] == "2019*"
    essay = tmp_path / "essay.txt"
    essay.write_text(f"Russia produced {rows[1][-1]} metric tons in 2019, ahead of South Africa with "
                     f"{rows[2][-1]}.\n\nCanada stood at 31 tons in 2019.", encoding="utf-8")
    golden = tmp_path / "golden.txt"
    golden.write_text("Russia produced 86 metric tons in 2019.", encoding="utf-8")
    result = CliRunner().invoke(main, ["score", str(essay), "--chart-data", str(csv_path), "--golden", str(golden)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["numeric"]["figures"] == 3 and out["numeric"]["unmatched"] == ["31"]  # Canada: 20
    assert out["numeric"]["precision"] == pytest.approx(2 / 3)
    assert out["words"] > 10 and out["three_step"] is False and 0 < out["chrf_to_golden"] < 100
    bad = CliRunner().invoke(main, ["score", str(essay), "--chart-data", str(tmp_path / "missing.csv")])
    assert bad.exit_code == 1 and "score: --chart-data: data file missing: missing.csv" in bad.output
