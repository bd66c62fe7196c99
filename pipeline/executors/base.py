"""One executor interface and the one pipeline loop (the kubeflow/sdk lesson: one backend ABC, a local and a
Kubernetes backend behind it). An executor runs one stage (``run_stage(spec, ctx) -> Outcome``) and can say
where a stage is (``status``), show its logs (``logs``) and stop it (``cancel``); which stages to skip, and
what to clear before a forced rerun, is decided here only (``skip_or_clear``).
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from pipeline.artifacts import save_run_config
from pipeline.config import RunConfig
from pipeline.context import StageContext, store_for
from pipeline.errors import ConfigError, StageError
from pipeline.stages import StageSpec, load_stage, spec
from pipeline.store import SUCCESS, ArtifactStore

log = logging.getLogger("ielts_distill")
EXECUTORS = {"local": "pipeline.executors.local:LocalExecutor", "k8s": "pipeline.executors.k8s:KubeExecutor"}


@dataclass(frozen=True)
class Outcome:
    stage: str
    ok: bool
    state: str  # complete | shard done | skipped | failed
    detail: str = ""  # failed: the one-line reason; else where the result is


class Executor(ABC):
    """Runs stages somewhere; the store stays the only hand-off between stages and the source of truth."""

    def __init__(self, config: RunConfig, store: ArtifactStore | None = None,
                 echo: Callable[[str], None] | None = None):
        self.config = config
        self.store = store if store is not None else store_for(config)
        self.echo = echo or log.info
        self.force = False

    def prepare(self, specs: Sequence[StageSpec], force: bool) -> None:
        """Before the first stage runs (the k8s executor checks and applies its objects here)."""
        self.force = force

    @abstractmethod
    def run_stage(self, spec: StageSpec, ctx: StageContext) -> Outcome:
        """Run one (not yet complete) stage, or this context's shard of it, until it ends."""

    @abstractmethod
    def status(self, spec: StageSpec, ctx: StageContext) -> str:
        """One line: where the stage is in this executor (beyond what the store says)."""

    @abstractmethod
    def logs(self, spec: StageSpec, ctx: StageContext) -> Iterator[str]:
        """The stage's log lines this executor can still reach."""

    @abstractmethod
    def cancel(self, spec: StageSpec, ctx: StageContext) -> bool:
        """Stop the stage if it runs; True when something was stopped. Finished records stay in the store."""

    def interrupted(self, specs: Sequence[StageSpec], cleanup: bool) -> None:
        """After Ctrl-C in the pipeline loop."""


def clear_stage(ctx: StageContext) -> int:
    """Forget a stage's outputs before a forced rerun, except its per-item records: a rerun must never
    request paid results again. Records whose inputs changed are moved aside by the stage itself
    (``RecordSet.keep_if_inputs``: ``records/_stale/<time>/``)."""
    records = ctx.key("records") + "/"
    keys = [k for k in ctx.store.list(ctx.key("")) if not k.startswith(records)]
    ctx.store.delete(ctx.key(SUCCESS))  # first, so a crash mid-way never leaves a stale mark
    for key in keys:
        ctx.store.delete(key)
    return len(keys)


def skip_or_clear(ctx: StageContext, force: bool) -> bool:
    """The one rule: True when the stage is complete and not forced (skip it). A forced stage, complete or
    not (a half-trained finetune restarts from zero), is validated first (the stage module's optional
    ``check(ctx)``, which raises when a rerun cannot work), then cleared (``clear_stage``): validate, then
    purge."""
    if not force:
        return ctx.is_complete()
    check = getattr(load_stage(ctx.stage), "check", None)
    if check is not None:
        check(ctx)
    clear_stage(ctx)
    return False


def run_one(executor: Executor, ctx: StageContext, force: bool = False) -> Outcome:
    """Skip, or (clear and) run one stage through ``executor``; a failure raises StageError with its line."""
    if skip_or_clear(ctx, force):
        executor.echo(f"[{ctx.stage}] already complete ({ctx.store.url(ctx.key(SUCCESS))}): skipped")
        return Outcome(ctx.stage, True, "skipped")
    outcome = executor.run_stage(spec(ctx.stage), ctx)
    if not outcome.ok:
        raise StageError(outcome.detail)
    return outcome


def run_pipeline(executor: Executor, stages: Sequence[str], force: bool = False,
                 cleanup: bool = False) -> ArtifactStore:
    """Every selected stage in pipeline order; stages complete in the store are skipped unless ``force``."""
    specs = [spec(s) for s in stages]
    save_run_config(executor.config, executor.store)
    executor.prepare(specs, force)
    try:
        for s in specs:
            run_one(executor, StageContext(config=executor.config, store=executor.store, stage=s.name), force)
    except KeyboardInterrupt:
        executor.interrupted(specs, cleanup)
        raise
    return executor.store


def executor_for(name: str, config: RunConfig, **kwargs) -> Executor:
    """The executor named ``name`` (``run.executor`` or ``--executor``): local | k8s."""
    if name not in EXECUTORS:
        raise ConfigError(f"executor {name!r}: unknown (executors: {', '.join(EXECUTORS)})")
    module, _, cls = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(config, **kwargs)
