"""The pipeline's stages, in order. Each is one module here exposing ``run(ctx: StageContext)``.

A stage reads its inputs from the artifact store (``ctx.input_key``) and writes its outputs under
``<run.id>/<stage>/`` (``ctx.key``); it calls ``ctx.complete(summary)`` last, which writes ``_SUCCESS``.
A sharded stage (teacher, generate, judge) completes only when every item has a record, so the last
shard to finish writes the stage-level outputs. A module may also define ``progress(ctx) -> (done,
total)`` so ``status`` can show partial work.

Modules are imported lazily: ``ielts-distill status`` must not pay for importing torch.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES: tuple[str, ...] = ("ingest", "teacher", "dataset", "finetune", "generate", "judge", "report")


def load_stage(name: str) -> ModuleType:
    if name not in STAGES:
        from pipeline.errors import PipelineError

        raise PipelineError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    return importlib.import_module(f"pipeline.stages.{name}")
