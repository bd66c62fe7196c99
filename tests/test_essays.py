"""The shared essay parser: the seed's golden pair, every messy teacher form, garbage, the CLI filter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.essays import (
    EssayFormatError,
    StructuredEssay,
    essay_paragraphs,
    parse_structured,
    to_canonical,
    unstructure,
    word_count,
)

CLI = Path(sys.executable).parent / "ielts-distill"


def _text_block_after(seed: str, heading: str) -> str:
    """The first ```text block after a heading of the seed, exactly as written."""
    start = seed.index("```text\n", seed.index(heading)) + len("```text\n")
    return seed[start:seed.index("\n```", start)]


@pytest.fixture(scope="module")
def golden(seed_text) -> tuple[str, str]:
    return (_text_block_after(seed_text, "### Structured Dataset:"),
            _text_block_after(seed_text, "### Unstructured Dataset:"))


def test_golden_seed_pair(golden):
    structured, unstructured = golden
    assert unstructure(structured) == unstructured
    assert to_canonical(structured) == structured  # the seed's record layout is the canonical layout
    essay = parse_structured(structured)
    assert isinstance(essay, StructuredEssay) and len(essay.paragraphs) == 3
    assert essay.description.startswith("The bar chart illustrates") and essay.overview.startswith("Overall,")


def test_cli_unstructure_reproduces_seed_byte_for_byte(golden):
    structured, unstructured = golden
    out = subprocess.run([str(CLI), "unstructure"], input=structured.encode(), capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == (unstructured + "\n").encode()


def test_cli_unstructure_rejects_garbage_with_one_line(golden):
    out = subprocess.run([str(CLI), "unstructure"], input=golden[1].encode(), capture_output=True, timeout=60)
    assert out.returncode != 0 and out.stdout == b""
    err = out.stderr.decode().strip()
    assert err.startswith("error: ") and "\n" not in err and "no step headers" in err


# Each transform turns the seed's clean record into one messy form the teacher produces.
PIE_HEADERS = {"1. <Describe a graph>:": "1. <Describe a graph:>",
               "2. <Find the key points, trends and compare data>:": "2. <Find the key points and trends:>",
               "3. <Write a summary of presented data>:": "3. <Write a summary of presented data:>"}


def _replace_all(text: str, mapping: dict[str, str]) -> str:
    for old, new in mapping.items():
        assert old in text
        text = text.replace(old, new)
    return text


MESSY = {
    "pie_prompt_headers": lambda s: _replace_all(s, PIE_HEADERS),
    "colon_inside_record_wording": lambda s: re.sub(r"<([^<>]+)>:", r"<\1:>", s),
    "no_colon_at_all": lambda s: re.sub(r"<([^<>]+)>:", r"<\1>", s),
    "paragraph_no_space": lambda s: re.sub(r"Paragraph (\d):", r"Paragraph\1:", s),
    "paragraph_bold": lambda s: re.sub(r"Paragraph (\d):", r"**Paragraph \1:**", s),
    "paragraph_bold_colon_outside": lambda s: re.sub(r"Paragraph (\d):", r"**Paragraph \1**:", s),
    "curly_quotes": lambda s: re.sub(r'"([^"\n]+)"', "\u201c\\1\u201d", s),
    "no_quotes": lambda s: s.replace('"', ""),
    "crlf": lambda s: s.replace("\n", "\r\n"),
    "trailing_spaces": lambda s: s.replace("\n", "  \n").replace(":", ": ", 2) + "   ",
    "bold_and_markdown_headers": lambda s: re.sub(r"^(\d\. <[^<>]+>:)$", r"### **\1**", s, flags=re.M),
    "text_on_marker_lines": lambda s: re.sub(r"(>:|Paragraph \d:)\n", r"\1 ", s),
    "blank_line_after_labels": lambda s: re.sub(r"(Paragraph \d:)\n", "\\1\n\n", s),
    "no_paragraph_labels": lambda s: re.sub(r"Paragraph \d:\n", "", s),
    "bare_headers": lambda s: re.sub(r"<([^<>]+)>:", r"\1:", s),
    "step_word_headers": lambda s: re.sub(r"^(\d)\. <", r"Step \1: <", s, flags=re.M),
    "paragraph_with_topic": lambda s: re.sub(r"Paragraph (\d):", r"Paragraph \1 (key trend):", s),
    "headers_without_numbers": lambda s: re.sub(r"^\d\. <", "<", s, flags=re.M),
    "preamble_and_title_echo": lambda s: 'Here is the essay.\n<TITLE_LAST>: "Student debt"\n[chart.png].\n'
                                         "Follow given structured input:\n" + s,
    "step2_header_forgotten": lambda s: s.replace("2. <Find the key points, trends and compare data>:\n", ""),
    "wrapped_lines": lambda s: s.replace(". In 1989,", ".\nIn 1989,").replace(" However,", "\nHowever,"),
    "everything_at_once": lambda s: re.sub(r"Paragraph (\d):", r"**Paragraph\1:**", re.sub(
        r'"([^"\n]+)"', "\u201c\\1\u201d", _replace_all(s, PIE_HEADERS))).replace("\n", " \r\n"),
}


@pytest.mark.parametrize("form", sorted(MESSY))
def test_messy_forms_normalise_to_the_same_output(golden, form):
    structured, unstructured = golden
    messy = MESSY[form](structured)
    assert messy != structured
    assert unstructure(messy) == unstructured
    assert to_canonical(messy) == structured


def test_seed_pie_prompt_examples_parse(seed_text):
    seed = seed_text
    prompt = seed[seed.index("### Example prompt for pie chart:"):seed.index("### Dataset Variants")]
    examples = re.split(r"^Example \d\.$|^Answer\.$", prompt, flags=re.M)[1:4]
    parsed = [parse_structured(e) for e in examples]
    assert [len(p.paragraphs) for p in parsed] == [2, 3, 2]
    assert parsed[0].description.startswith("The two pie charts") and parsed[0].description.endswith("2005).")
    assert parsed[1].paragraphs[2].startswith("The least popular") and '"' not in unstructure(examples[1])
    assert all("TITLE" not in p.description and "IMAGE" not in p.description for p in parsed)


def test_inner_quotes_and_canonical_idempotence():
    text = ('1. <Describe a graph>:\n"The chart shows the so-called "gig economy"."\n\n'
            '2. <Find the key points>:\nParagraph 1:\n"It grew."\n\n3. <Write a summary>:\n"Overall, up."')
    essay = parse_structured(text)
    assert essay.description == 'The chart shows the so-called "gig economy".'
    once = to_canonical(text)
    assert to_canonical(once) == once and parse_structured(once) == essay


GARBAGE = {
    "empty": ("", "empty essay"),
    "whitespace": ("  \r\n\n ", "empty essay"),
    "question_list": ("1. What is the percentage of foreign-born population in the U.S. in 1840?\n"
                      "2. What is the percentage of foreign-born population in the U.S. in 1920?", "no step headers"),
    "markdown_alternative": ("The line chart illustrates removals.\n\n**Removals of unauthorized immigrants:**\n\n"
                             "- **Total:** up from 188,467\n\n**Conclusion:**\n\nOverall, up.", "no step headers"),
    "missing_summary": ('1. <Describe a graph>:\n"A chart."\n\n2. <Find the key points>:\n"Up."', "missing step 3"),
    "only_summary": ('3. <Write a summary of presented data>:\n"Overall, up."', "missing step 1"),
    "empty_step": ('1. <Describe a graph>:\n""\n2. <Find the key points>:\n"Up."\n3. <Write a summary>:\n"Up."',
                   "step 1 (graph description) is empty"),
    "duplicate_step": ('1. <Describe a graph>:\n"A."\n2. <Find the key points>:\n"B."\n'
                       '2. <Find the key points>:\n"C."\n3. <Write a summary>:\n"D."', "step 2 (key points) header appears twice"),
    "out_of_order": ('2. <Find the key points>:\n"B."\n1. <Describe a graph>:\n"A."\n3. <Write a summary>:\n"D."',
                     "step 1 (graph description) comes after step 2"),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_rejected_with_one_line_reason(case):
    text, reason = GARBAGE[case]
    with pytest.raises(EssayFormatError) as err:
        unstructure(text)
    assert reason in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_plain_prose_is_not_structure(golden):
    with pytest.raises(EssayFormatError, match="no step headers"):
        parse_structured(golden[1])


def test_word_count_and_paragraphs(golden):
    structured, unstructured = golden
    assert essay_paragraphs(structured) == essay_paragraphs(unstructured) == unstructured.split("\n\n")
    assert word_count(structured) == word_count(unstructured) == len(unstructured.split())
    small = ('1. <Describe a graph>:\n"The chart shows sales."\n\n2. <Find the key points>:\n\nParagraph 1:\n'
             '"Sales rose 5% in 2001."\n\n3. <Write a summary>:\n"Overall, sales grew \u2014 steadily."')
    assert word_count(small) == 4 + 5 + 4  # markers, labels, quotes and the lone dash are not words
    assert essay_paragraphs("One.\r\n\r\n\r\nTwo  words.\n") == ["One.", "Two words."]
    assert word_count("") == 0
    # a word is a whitespace-separated token with a letter or digit: Unicode digits and letters count,
    # underscores, dashes and symbols alone do not
    tricky = "_ __ x_ -- \u2014 \u0663\u0664 \u00e9t\u00e9 4,751,653 (5%) \u00a3 \u2013a\u2013 \u00b2 \u2167 ..."
    assert word_count(tricky) == sum(any(ch.isalnum() for ch in tok) for tok in tricky.split()) == 8


def test_parsed_essays_are_independent_copies(golden):
    """Parsing is cached per text: what a caller changes in one result never shows in the next."""
    first = parse_structured(golden[0])
    first.paragraphs.append("changed")
    paragraphs = essay_paragraphs(golden[0])
    paragraphs.clear()
    assert parse_structured(golden[0]).paragraphs == golden[1].split("\n\n")[1:-1]
    assert essay_paragraphs(golden[0]) == golden[1].split("\n\n")
