"""The store layout, in one place: every key a stage writes and the typed readers other stages use.

A run lives under ``<run.id>/`` in the store; each stage owns ``<run.id>/<stage>/``::

    ingest/    charts.jsonl  rejected.jsonl  images/<chart>.<fmt>
    teacher/   essays.jsonl  records/<chart>.json  records/_claims/<chart>.claim
    dataset/   splits.json   <variant>/data/<split>-00000-of-00001.parquet  <variant>/README.md
    finetune/  student/ (a built student + _READY)  <variant>/{adapter/,checkpoints/,metrics.jsonl,
               loss.png,summary.json}
    generate/  essays.jsonl  records/<model>/<chart>.json
    judge/     verdicts.jsonl  records/<comparison>%2F<chart>%2F<order>.json
    report/    summary.json  report.md  report.html  <figure>.png

An item id is one escaped name in every key (``pipeline.records.item_key``: chart ``a/b`` is ``a%2Fb``), so
ids never collide or leave their folder. Stages never import each other: a stage writes with ``ctx.key(...)``
using the names here and reads an upstream stage with the functions here. Heavy imports (datasets, pyarrow) stay inside functions.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ArtifactNotFound, StageError
from pipeline.stages import DATASET, FINETUNE, GENERATE, INGEST, JUDGE, REPORT, TEACHER

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.context import StageContext
    from pipeline.store import ArtifactStore

# ---------------------------------------------------------------- file names (relative to the stage folder)
CHARTS = "charts.jsonl"
REJECTED = "rejected.jsonl"
IMAGES = "images"
TEACHER_ESSAYS = "essays.jsonl"
SPLITS = "splits.json"
DATASET_CARD = "README.md"
STUDENT = "student"  # finetune/student/: the student base built into the run (tiny or from a GGUF)
READY = "_READY"  # written last into a built student's folder
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"
VARIANT_SUMMARY = "summary.json"
GENERATED_ESSAYS = "essays.jsonl"
VERDICTS = "verdicts.jsonl"
REPORT_SUMMARY = "summary.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
RUN_CONFIG = "config.yaml"  # <run.id>/config.yaml: the resolved config beside the run (no secrets)

SPLIT_NAMES = ("train", "validation", "test")
VARIANTS = ("structured", "unstructured")
BASELINE = "baseline"  # the base student without an adapter, in generate's and judge's records
ORDERS = ("ab", "ba")  # a verdict record's order: which model's essay the judge saw first
VIEWS = ("neutral", "as_written")  # a verdict record's view: every text in one layout, or candidates as written
SELFTEST_GOLDEN = "good"  # the judge's self-test: the good essay (the chart's human summary) ...
SELFTEST_PREFIX = "selftest-"  # ... against "selftest-<corruption>", a copy made worse in one known way


def save_run_config(config: RunConfig, store: ArtifactStore) -> None:
    """Keep the resolved config beside the run's artifacts (it holds env var names, never secrets)."""
    from pipeline.config import dump_config

    store.put_text(f"{config.run.id}/{RUN_CONFIG}", dump_config(config))


def report_page_key(run_id: str) -> str:
    """The run's result page (what ``ielts-distill run`` prints last)."""
    return f"{run_id}/{REPORT}/{REPORT_HTML}"


def split_sizes(n: int, train: float, test: float) -> dict[str, int]:
    """How many of ``n`` usable essays the dataset puts in each split (``dataset.train``/``dataset.test`` shares;
    validation gets the rest): the dataset stage's cut, and what the teacher draws charts for."""
    n_train, n_test = int(n * train + 1e-9), int(n * test + 1e-9)
    return {"train": n_train, "test": n_test, "validation": n - n_train - n_test}


def split_file(split: str) -> str:
    """A split's Parquet file inside a variant folder (the Hub's layout, so the folder pushes as it is)."""
    return f"data/{split}-00000-of-00001.parquet"


def image_key(ctx: StageContext, chart_id: str, fmt: str) -> str:
    """Where ingest stores a chart's image (the key is recorded in the chart row as ``image``): the chart id
    escaped into one name (pipeline.records.item_key), so no id reaches another's image or leaves images/."""
    from pipeline.records import item_key

    return item_key(ctx.key(IMAGES), chart_id, f".{fmt}")


# ---------------------------------------------------------------- ingest


def charts(ctx: StageContext) -> list[dict[str, Any]]:
    """The accepted charts (ingest's ``charts.jsonl``)."""
    ctx.require(INGEST)
    return ctx.store.get_jsonl(ctx.input_key(INGEST, CHARTS))


def charts_by_id(ctx: StageContext) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in charts(ctx)}


# ---------------------------------------------------------------- teacher


def teacher_records(ctx: StageContext) -> list[dict[str, Any]]:
    """Every teacher record (accepted and rejected), from ``teacher/essays.jsonl``."""
    ctx.require(TEACHER)
    return ctx.store.get_jsonl(ctx.input_key(TEACHER, TEACHER_ESSAYS))


def golden_essays(ctx: StageContext) -> dict[str, str]:
    """{chart_id: the teacher's accepted essay}: the golden essay of judge and report."""
    return {r["chart_id"]: r["essay"] for r in teacher_records(ctx) if r.get("status") == "accepted"}


# ---------------------------------------------------------------- dataset


def splits(ctx: StageContext) -> dict[str, str]:
    """{chart_id: split} (ArtifactNotFound when the dataset stage has not run)."""
    return ctx.store.get_json(ctx.input_key(DATASET, SPLITS))


def has_splits(ctx: StageContext) -> bool:
    return ctx.store.exists(ctx.input_key(DATASET, SPLITS))


def split_ids(ctx: StageContext, split: str) -> list[str]:
    """The sorted chart ids of one split."""
    return sorted(cid for cid, s in splits(ctx).items() if s == split)


def load_split(ctx: StageContext, variant: str, split: str):
    """One split of one variant as a ``datasets.Dataset`` (images decode to PIL)."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    if variant not in VARIANTS or split not in SPLIT_NAMES:
        raise StageError(f"dataset split {variant}/{split}: variant must be one of {', '.join(VARIANTS)} and "
                         f"split one of {', '.join(SPLIT_NAMES)}")
    ctx.require(DATASET)
    key = ctx.input_key(DATASET, variant, split_file(split))
    if not ctx.store.exists(key):
        raise StageError(f"dataset variant '{variant}' was not built (no {ctx.store.url(key)}); "
                         "see dataset.variants")
    return Dataset(pq.read_table(io.BytesIO(ctx.store.get_bytes(key))))


def dataset_mark(ctx: StageContext) -> str:
    """The dataset stage's completion mark: changes with every dataset build (finetune's checkpoint fingerprint)."""
    from pipeline.store import SUCCESS

    return ctx.store.get_text(ctx.input_key(DATASET, SUCCESS))


def dataset_folder(ctx: StageContext, variant: str) -> str:
    return ctx.input_key(DATASET, variant)


# ---------------------------------------------------------------- finetune


def student_prefix(ctx: StageContext) -> str:
    return ctx.input_key(FINETUNE, STUDENT)


def student_ready(ctx: StageContext) -> bool:
    return ctx.store.exists(f"{student_prefix(ctx)}/{READY}")


def fetch_student(ctx: StageContext, local_dir: str | Path) -> Path:
    """Download the student built into the run (``finetune/student/``) to ``local_dir/student``."""
    if not student_ready(ctx):
        raise StageError(f"no student at {ctx.store.url(student_prefix(ctx))}: run the finetune stage first")
    return ctx.store.download_dir(student_prefix(ctx), Path(local_dir) / STUDENT)


def publish_student(ctx: StageContext, local: str | Path) -> None:
    """Upload a built student; ``_READY`` goes last so a half upload is never used."""
    ctx.store.upload_dir(local, student_prefix(ctx))
    ctx.store.put_text(f"{student_prefix(ctx)}/{READY}", "")


def student_base(ctx: StageContext, local_dir: str | Path) -> str:
    """The base model every stage loads: ``student.model`` (Hub id or path), or with ``student.build`` the
    student built into the run (finetune builds it), downloaded to ``local_dir``."""
    if not ctx.config.student.build:
        return ctx.config.student.model
    return str(fetch_student(ctx, local_dir))


def variant_key(ctx: StageContext, variant: str, *parts: str) -> str:
    return ctx.input_key(FINETUNE, variant, *parts)


def variant_trained(ctx: StageContext, variant: str) -> bool:
    return ctx.store.exists(variant_key(ctx, variant, VARIANT_SUMMARY))


def fetch_adapter(ctx: StageContext, variant: str, local_dir: str | Path) -> Path:
    return ctx.store.download_dir(variant_key(ctx, variant, ADAPTER), Path(local_dir) / f"adapter-{variant}")


def training_metrics(ctx: StageContext, variant: str) -> list[dict[str, Any]]:
    key = variant_key(ctx, variant, METRICS)
    return ctx.store.get_jsonl(key) if ctx.store.exists(key) else []


def variant_summary(ctx: StageContext, variant: str) -> dict[str, Any]:
    return ctx.store.get_json(variant_key(ctx, variant, VARIANT_SUMMARY))


def loss_png(ctx: StageContext, variant: str) -> bytes | None:
    key = variant_key(ctx, variant, LOSS_PNG)
    return ctx.store.get_bytes(key) if ctx.store.exists(key) else None


def finetune_mark(ctx: StageContext) -> str:
    """Finetune's completion mark: changes with every training run (generate's inputs fingerprint)."""
    from pipeline.store import SUCCESS

    return ctx.store.get_text(ctx.input_key(FINETUNE, SUCCESS))


# ---------------------------------------------------------------- generate and judge


def generated_essays(ctx: StageContext) -> list[dict[str, Any]]:
    """Every generated essay row {model, chart_id, essay, ...} (generate's ``essays.jsonl``)."""
    ctx.require(GENERATE)
    return ctx.store.get_jsonl(ctx.input_key(GENERATE, GENERATED_ESSAYS))


def verdicts(ctx: StageContext) -> list[dict[str, Any]]:
    ctx.require(JUDGE)
    return ctx.store.get_jsonl(ctx.input_key(JUDGE, VERDICTS))


def jsonl_or_empty(ctx: StageContext, stage: str, name: str) -> list[dict[str, Any]]:
    """An upstream JSONL file, or [] when that stage wrote none (the report renders what exists)."""
    try:
        return ctx.store.get_jsonl(ctx.input_key(stage, name))
    except ArtifactNotFound:
        return []
