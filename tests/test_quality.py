"""Quality gates and failure-mode detectors on crafted essays (pipeline.quality)."""

from __future__ import annotations

import pytest

from pipeline.config import TeacherSection
from pipeline.quality import MODES, failure_modes, gate, invented_numbers, numbers_in, numbers_in_table, \
    numeric_faithfulness

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
    assert numeric_faithfulness(essay, TABLE) == pytest.approx(1 - 1 / len(numbers_in(essay)))


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
