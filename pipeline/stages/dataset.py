"""dataset: the teacher's accepted essays as two Hugging Face datasets, *structured* and *unstructured*.

The seed's central experiment: the same essays, for the same charts, in the same splits, once in the one
canonical three-step layout (``essays.to_canonical``) and once as plain paragraphs (``essays.unstructure``).
An accepted essay whose steps cannot be parsed is, with ``dataset.infer_structure`` and >= 3 prose
paragraphs, read as description / body paragraphs / overview; otherwise it is left out of BOTH variants
(so they stay paired) and counted in the card. Rejected teacher records are counted, never used.

Splits are assigned by a stable salted hash of the chart id, with sizes floor(n*train), floor(n*test)
and the rest validation (3,475 -> 2,432 / 521 / 522, as in the seed). Output under ``<run>/dataset/``:
``<variant>/data/<split>-00000-of-00001.parquet``, ``<variant>/README.md`` (the Hub's dataset card) and
``splits.json`` = {chart_id: split}.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline import artifacts
from pipeline.config import DatasetSection, RunConfig
from pipeline.context import StageContext
from pipeline.errors import StageError
from pipeline.essays import (
    EssayFormatError,
    canonical,
    structure_of,
)
from pipeline.records import stable_hash
from pipeline.stages import DATASET
from pipeline.store import ArtifactStore

SPLITS = artifacts.SPLIT_NAMES
VARIANTS = artifacts.VARIANTS
COLUMNS = {"chart_id": "string", "type": "string", "title": "string", "image": "image", "essay": "string",
           "data": "string"}


# --------------------------------------------------------------------------- the split


def split_sizes(n: int, cfg: DatasetSection) -> dict[str, int]:
    return artifacts.split_sizes(n, cfg.train, cfg.test)


def assign_splits(chart_ids: list[str], cfg: DatasetSection) -> dict[str, str]:
    """{chart_id: split}: ids ordered by their salted hash, cut at the split sizes (input order is irrelevant)."""
    ordered = sorted(set(chart_ids), key=lambda i: (stable_hash(i, cfg.seed), i))
    sizes = split_sizes(len(ordered), cfg)
    names = ["train"] * sizes["train"] + ["test"] * sizes["test"] + ["validation"] * sizes["validation"]
    return dict(zip(ordered, names))


# --------------------------------------------------------------------------- essays -> variants


def build_rows(charts: list[dict[str, Any]], records: list[dict[str, Any]], cfg: DatasetSection,
               table_in_prompt: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per usable chart (with both essay forms) and the counts the card reports. ``table_in_prompt``:
    each row's ``data`` holds the chart's data as the student's prompt gives it ('' otherwise)."""
    from pipeline.prompts import student_data

    by_id = {c["id"]: c for c in charts}
    rows, counts = [], {"teacher_records": len(records), "rejected_by_teacher": 0, "rejected_reasons": Counter(),
                        "excluded_unparseable": 0, "excluded_reasons": Counter(), "structure_inferred": 0,
                        "teacher_models": Counter(), "table_in_prompt": table_in_prompt}
    for rec in records:
        chart = by_id.get(rec.get("chart_id"))
        if chart is None:
            raise StageError(f"teacher record for chart {rec.get('chart_id')!r} has no chart in ingest/charts.jsonl")
        if rec.get("status") != "accepted":
            counts["rejected_by_teacher"] += 1
            counts["rejected_reasons"][str(rec.get("reason") or "unknown").split(":")[0][:80]] += 1
            continue
        try:
            steps, inferred = structure_of(rec.get("essay") or "", cfg.infer_structure)
        except EssayFormatError as why:
            counts["excluded_unparseable"] += 1
            counts["excluded_reasons"][str(why).split(" (")[0]] += 1
            continue
        counts["structure_inferred"] += inferred
        counts["teacher_models"][(rec.get("model"), rec.get("template"), rec.get("template_version"))] += 1
        rows.append({"chart_id": chart["id"], "type": chart["type"], "title": chart["title"],
                     "data": student_data(chart) if table_in_prompt else "",
                     "image_key": chart["image"], "image_format": chart.get("image_format", "png"),
                     "structured": canonical(steps), "unstructured": "\n\n".join(steps.prose())})
    return sorted(rows, key=lambda r: r["chart_id"]), counts


# --------------------------------------------------------------------------- writing


def _features():
    from datasets import Features, Image, Value

    return Features({name: Image() if dtype == "image" else Value(dtype) for name, dtype in COLUMNS.items()})


def _parquet(rows: list[dict[str, Any]], variant: str, images: dict[str, bytes], tmp: Path) -> bytes:
    import datasets

    columns = {
        "chart_id": [r["chart_id"] for r in rows], "type": [r["type"] for r in rows],
        "title": [r["title"] for r in rows],
        "image": [{"bytes": images[r["chart_id"]], "path": f"{r['chart_id']}.{r['image_format']}"} for r in rows],
        "essay": [r[variant] for r in rows], "data": [r["data"] for r in rows]}
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        datasets.Dataset.from_dict(columns, features=_features()).to_parquet(str(tmp))
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    return tmp.read_bytes()


def run(ctx: StageContext) -> None:
    cfg = ctx.config.dataset
    charts = artifacts.charts(ctx)
    records = artifacts.teacher_records(ctx)
    rows, counts = build_rows(charts, records, cfg, ctx.config.student.table_in_prompt)
    if not rows:
        raise StageError(f"no usable essays: {counts['rejected_by_teacher']} of {len(records)} teacher records "
                         f"rejected, {counts['excluded_unparseable']} accepted but without parseable steps")
    splits = assign_splits([r["chart_id"] for r in rows], cfg)
    with ThreadPoolExecutor(max_workers=8) as pool:
        images = dict(zip((r["chart_id"] for r in rows), pool.map(ctx.store.get_bytes, (r["image_key"] for r in rows))))

    ctx.store.delete_prefix(ctx.key() + "/")  # a rerun replaces every output, _SUCCESS first
    by_split = {s: [r for r in rows if splits[r["chart_id"]] == s] for s in SPLITS}
    with tempfile.TemporaryDirectory(prefix="ielts-dataset-") as tmp:
        for variant in cfg.variants:
            for split in SPLITS:
                data = _parquet(by_split[split], variant, images, Path(tmp) / f"{variant}-{split}.parquet")
                ctx.store.put_bytes(ctx.key(variant, artifacts.split_file(split)), data)
            ctx.store.put_text(ctx.key(variant, artifacts.DATASET_CARD),
                               dataset_card(ctx, variant, by_split, counts))
    ctx.store.put_json(ctx.key(artifacts.SPLITS), splits)
    summary = {"rows": len(rows), "splits": {s: len(by_split[s]) for s in SPLITS}, "variants": list(cfg.variants),
               "rejected_by_teacher": counts["rejected_by_teacher"],
               "excluded_unparseable": counts["excluded_unparseable"],
               "structure_inferred": counts["structure_inferred"], "table_in_prompt": counts["table_in_prompt"]}
    ctx.log.info("dataset: %d essays -> train %d / validation %d / test %d (%s); %d rejected by the teacher, "
                 "%d unparseable left out, %d with inferred structure", len(rows), *summary["splits"].values(),
                 ", ".join(cfg.variants), counts["rejected_by_teacher"], counts["excluded_unparseable"],
                 counts["structure_inferred"])
    ctx.complete(summary)


# --------------------------------------------------------------------------- publishing


def push_to_hub(config: RunConfig, store: ArtifactStore, variant: str, repo: str, *, private: bool = False) -> str:
    """Upload one variant's folder (Parquet + card) to a Hub dataset repo; the token comes from $HF_TOKEN."""
    from huggingface_hub import HfApi

    ctx = StageContext(config, store, DATASET)
    ctx.require(DATASET)
    with tempfile.TemporaryDirectory(prefix="ielts-push-") as tmp:
        ctx.store.download_dir(artifacts.dataset_folder(ctx, variant), tmp)
        try:
            api = HfApi()
            api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
            api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=tmp,
                              commit_message=f"ielts-distill run {ctx.run_id}: {variant} variant")
        except Exception as exc:  # the Hub client's many error types: report one line, no traceback
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise StageError(f"push to hub dataset {repo}: {exc.__class__.__name__}: {first}") from None
    return f"https://huggingface.co/datasets/{repo}"


# --------------------------------------------------------------------------- the dataset card


def dataset_card(ctx: StageContext, variant: str, by_split: dict[str, list[dict[str, Any]]],
                 counts: dict[str, Any]) -> str:
    """README.md with the YAML header the Hub reads (:mod:`pipeline.report.card`)."""
    from pipeline.report.card import dataset_card as card

    return card(variant, by_split, counts, ctx.config.dataset, ctx.run_id, ctx.summary_of("ingest"), COLUMNS)
