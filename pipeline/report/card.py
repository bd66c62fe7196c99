"""The Hub dataset card (``README.md`` of a dataset variant), from ``huggingface_hub``'s card templates.

``DatasetCardData`` gives the YAML header the Hub reads (configs, features, splits, licence);
``DatasetCard.from_template`` renders ``templates/dataset_card.md`` with the counts computed here.
"""

from __future__ import annotations

from collections import Counter
from importlib import resources
from typing import TYPE_CHECKING, Any

from pipeline.artifacts import SPLIT_NAMES, VARIANTS, split_file

if TYPE_CHECKING:
    from pipeline.config import DatasetSection

VARIANT_TEXT = {
    "structured": "essays in one canonical three-step layout (`1. <Describe a graph>:`, `2. <Find the key points, "
                  "trends and compare data>:` with `Paragraph N:` labels, `3. <Write a summary of presented "
                  "data>:`).",
    "unstructured": "the same essays with every step header, paragraph label and quote removed: plain paragraphs "
                    "separated by one blank line.",
}


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    return "100K<n<1M"


def card_data(variant: str, by_split: dict[str, list[dict[str, Any]]], columns: dict[str, str]):
    from huggingface_hub import DatasetCardData

    rows = sum(len(by_split[s]) for s in SPLIT_NAMES)
    return DatasetCardData(
        license="other", license_name="chart-to-text-research-use",
        license_link="https://github.com/vis-nlp/Chart-to-text", language=["en"],
        pretty_name=f"IELTS Task 1 chart essays ({variant})", task_categories=["image-to-text"],
        tags=["ielts", "chart-summarization", "synthetic", "knowledge-distillation", variant],
        size_categories=[size_category(rows)],
        configs=[{"config_name": "default", "data_files": [
            {"split": s, "path": split_file(s).replace("-00000-of-00001.parquet", "-*")} for s in SPLIT_NAMES]}],
        dataset_info={"features": [{"name": n, "dtype": d} for n, d in columns.items()],
                      "splits": [{"name": s, "num_examples": len(by_split[s])} for s in SPLIT_NAMES]})


def dataset_card(variant: str, by_split: dict[str, list[dict[str, Any]]], counts: dict[str, Any],
                 cfg: DatasetSection, run_id: str, ingest: dict[str, Any], columns: dict[str, str]) -> str:
    """README.md of one variant: the YAML header and the body (how it was made, counts, fields, licence)."""
    from huggingface_hub import DatasetCard

    rows = [r for split in SPLIT_NAMES for r in by_split[split]]
    template = (resources.files("pipeline.report") / "templates" / "dataset_card.md").read_text(encoding="utf-8")
    card = DatasetCard.from_template(
        card_data(variant, by_split, columns), template_str=template,
        variant=variant, other=next(v for v in VARIANTS if v != variant), run_id=run_id,
        teacher=", ".join(sorted({str(m) for m, _, _ in counts["teacher_models"]})) or "none",
        templates=", ".join(sorted({f"{t} ({v})" for _, t, v in counts["teacher_models"]})) or "none",
        variant_text=VARIANT_TEXT[variant], structure_inferred=counts["structure_inferred"],
        table_in_prompt=counts.get("table_in_prompt", False),
        n_read=ingest.get("read", "?"), n_charts=ingest.get("accepted", "?"),
        teacher_records=counts["teacher_records"], rejected=counts["rejected_by_teacher"],
        excluded=counts["excluded_unparseable"], rows=len(rows),
        split_sizes={s: len(by_split[s]) for s in SPLIT_NAMES},
        reasons=[(title, counter.most_common()) for title, counter in
                 (("Teacher rejections", counts["rejected_reasons"]),
                  ("Left out as unparseable", counts["excluded_reasons"])) if counter],
        by_type=sorted(Counter(r["type"] for r in rows).items()),
        seed=cfg.seed, f_train=f"{cfg.train:g}", f_test=f"{cfg.test:g}")
    return str(card)
