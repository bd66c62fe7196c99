"""generate: an essay per test chart from the baseline (the base student, no adapter) and from each
fine-tuned variant, with identical decoding settings (greedy by default, ``generate.max_new_tokens``).

Per-item records ``<run>/generate/records/<model>/<chart_id>.json`` = {model, chart_id, essay, tokens,
seconds, finish} are written after each batch, so a rerun does only what is missing; ``--shard I/N`` (or an
Indexed Job) splits the charts. When every (model, chart) has a record, ``essays.jsonl`` (all records,
by model then chart id) is written and the stage completes.

Nothing is cut silently: ``finish`` is ``"length"`` when an essay hit the token limit (``"stop"`` when the
model ended it), the summary counts them per model, and an unset ``generate.max_new_tokens`` is derived
from the word limit (``teacher.max_words``) and SmolLM2's measured tokens per word with margin.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

from pipeline import artifacts
from pipeline.context import StageContext
from pipeline.errors import StageError

BASELINE = artifacts.BASELINE


def model_names(ctx: StageContext) -> list[str]:
    return [BASELINE, *(name for name, _, _ in ctx.config.finetune.units())]  # an adapter per variant (x seed)


def max_new_tokens(config) -> int:
    """The decoding limit of every model (``checks.generation_limit``)."""
    from pipeline.checks import generation_limit

    return generation_limit(config)


def decode_dtype(config) -> str:
    """The precision every model decodes in: "bfloat16" on CUDA, "float32" on a CPU. (bf16 on an AVX512-BF16 CPU
    decoded 1.8x faster but changed the demo's greedy essays: the structured student's from 229 to 369 words,
    8 of 15 cut at the limit, the same adapters: docs/training.md.)"""
    from pipeline.models.loading import pick_device, pick_dtype

    return str(pick_dtype(pick_device(config.student.device))).removeprefix("torch.")


def test_ids(ctx: StageContext) -> list[str]:
    """Test chart ids (sorted; the first ``generate.limit``), from the dataset's ``splits.json``."""
    ids = artifacts.split_ids(ctx, "test")
    limit = ctx.config.generate.limit
    return ids[:limit] if limit else ids


def load_test_charts(ctx: StageContext, ids: list[str]) -> dict[str, tuple[Any, str, str]]:
    """{chart_id: (PIL image, title, data)} for ``ids`` from the first variant's test split (the variants share
    charts and splits; only the essays differ). ``data``: the chart's data for the student's prompt, '' unless
    the dataset was built with ``student.table_in_prompt``."""
    from PIL import Image

    from pipeline.models.images import to_rgb

    wanted = set(ids)
    table = artifacts.load_split(ctx, ctx.config.dataset.variants[0], "test").cast_column("image", _raw_image())
    charts = {}
    for row in table:
        if row["chart_id"] in wanted:
            charts[row["chart_id"]] = (to_rgb(Image.open(io.BytesIO(row["image"]["bytes"]))), row["title"],
                                       row.get("data") or "")
    missing = wanted - charts.keys()
    if missing:
        raise StageError(f"generate: test chart {min(missing)} is in splits.json but not in the test split")
    return charts


def _raw_image():
    from datasets import Image

    return Image(decode=False)


def generate_for(ctx: StageContext, name: str, pending: list[str], charts: dict[str, tuple[Any, str]],
                 base: str, adapter: Path | None, tower: bool, tmp: Path, caches: dict[str, Any]) -> None:
    """``name``'s essays for the ``pending`` charts; ``caches`` (by ``cache_tag``) holds the prompts and
    vision features the models of one base share, so each chart's vision side runs once per stage. With
    ``tower`` (an adapter trained its connector) they hold the tower's output and each model applies its
    own connector."""
    from tqdm import tqdm

    from pipeline.models import generate_essays, load_student
    from pipeline.models.features import shared_cache

    cfg, student = ctx.config.generate, ctx.config.student
    model, processor = load_student(base, adapter=adapter, device=student.device,
                                    attn_implementation=student.attn_implementation, merge=True,
                                    image_longest_edge=student.image_longest_edge)
    cache = shared_cache(caches, base, processor, model.dtype, tmp / "charts", tower)
    records = ctx.records(name)
    bar = tqdm(total=len(pending), desc=f"generate {name}", unit="essay", disable=None)

    def store_batch(indices: list[int], results) -> None:
        for i, result in zip(indices, results):
            records.write(pending[i], {"model": name, "chart_id": pending[i], "essay": result.text,
                                       "tokens": result.tokens, "seconds": round(result.seconds, 4),
                                       "finish": result.finish})
        bar.update(len(indices))

    # chunks of a few batches: records land as batches finish, memory stays bounded, sorting still helps
    chunk, limit = cfg.batch_size * 8, max_new_tokens(ctx.config)
    for start in range(0, len(pending), chunk):
        ids = pending[start:start + chunk]
        generate_essays(model, processor, [charts[i] for i in ids], max_new_tokens=limit,
                        batch_size=cfg.batch_size, **cfg.decoding(), cache=cache, keys=ids,
                        on_batch=lambda idx, res, off=start: store_batch([off + i for i in idx], res))
    bar.close()


def run(ctx: StageContext) -> None:
    from pipeline.models.loading import cpu_threads, trains_connector

    ctx.require()
    ids = test_ids(ctx)
    if not ids:
        raise StageError("generate: the test split is empty")
    names = model_names(ctx)
    stale = ctx.records().keep_if_inputs(inputs_fingerprint(ctx))
    if stale:
        ctx.log.warning("generate: the models or decoding settings changed since the last run: "
                        "%d stale essays deleted", stale)
    pending = {name: ctx.records(name).pending(ids, ctx.shard) for name in names}
    todo = sorted({i for ids_ in pending.values() for i in ids_})
    if todo:
        charts = load_test_charts(ctx, todo)
        single = ctx.config.student.build == "tiny"
        with tempfile.TemporaryDirectory(prefix="ielts-generate-") as tmp, cpu_threads(single=single):
            base, caches = artifacts.student_base(ctx, tmp), {}
            # the adapters say whether they trained a connector (the config may have changed since finetune)
            adapters = {name: None if name == BASELINE else artifacts.fetch_adapter(ctx, name, tmp)
                        for name in names if pending[name]}
            tower = any(trains_connector(a) for a in adapters.values() if a is not None)
            for name, adapter in adapters.items():
                ctx.log.info("generate %s: %d of %d test charts to do (%s)", name, len(pending[name]), len(ids),
                             decode_dtype(ctx.config))
                generate_for(ctx, name, pending[name], charts, base, adapter, tower, Path(tmp), caches)

    def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
        models = {name: {"essays": len(ids),
                         "mean_tokens": round(sum(r["tokens"] for r in rows if r["model"] == name) / len(ids), 1),
                         "truncated": sum(r.get("finish") == "length" for r in rows if r["model"] == name)}
                  for name in names}
        truncated = {n: m["truncated"] for n, m in models.items() if m["truncated"]}
        if truncated:
            ctx.log.warning("generate: essays cut at max_new_tokens=%d (finish 'length'): %s", max_new_tokens(ctx.config),
                            ", ".join(f"{n} {k} of {len(ids)}" for n, k in truncated.items()))
        return {"charts": len(ids), "models": models, "max_new_tokens": max_new_tokens(ctx.config),
                "do_sample": ctx.config.generate.do_sample}

    ctx.collect_if_complete(artifacts.GENERATED_ESSAYS, [(ctx.records(name), ids) for name in names], summarize)


def inputs_fingerprint(ctx: StageContext) -> str:
    """What an essay depends on: the trained adapters (finetune's completion mark changes with every
    training run), the base student and the decoding settings."""
    from pipeline.records import fingerprint

    gen, student = ctx.config.generate, ctx.config.student
    return fingerprint(artifacts.finetune_mark(ctx), student.model, student.build, decode_dtype(ctx.config),
                       student.image_longest_edge, max_new_tokens(ctx.config), gen.do_sample, gen.min_new_tokens,
                       *([gen.repetition_penalty, "essay-only"] if gen.repetition_penalty != 1.0 else []),
                       *(["markers spared"] if gen.repetition_penalty != 1.0 and gen.penalty_spares_markers else []))


def progress(ctx: StageContext) -> tuple[int, int]:
    if not artifacts.has_splits(ctx):
        return 0, 0
    ids = set(test_ids(ctx))
    names = model_names(ctx)
    return sum(len(ids & ctx.records(n).done_ids()) for n in names), len(ids) * len(names)


def started(ctx: StageContext) -> bool:
    """``progress(ctx)[0] > 0`` without listing every record (``ielts-distill runs``), but from a record of
    any chart: records of charts no longer among the test ids (a lowered ``generate.limit``) count too."""
    return artifacts.has_splits(ctx) and any(ctx.records(n).started() for n in model_names(ctx))
