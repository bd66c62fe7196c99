"""Per-stage state of a run, read from the store: done / partial (with counts) / not started."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.config import RunConfig
from pipeline.context import StageContext, store_for
from pipeline.stages import STAGES, load_stage, spec
from pipeline.store import SUCCESS, ArtifactStore

if TYPE_CHECKING:
    from pipeline.executors.base import Executor


def _summary_line(summary: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return ", ".join(parts[:6])


def stage_status(config: RunConfig, store: ArtifactStore | None = None) -> list[dict[str, Any]]:
    store = store or store_for(config)
    rows = []
    for name in STAGES:
        ctx = StageContext(config=config, store=store, stage=name)
        row: dict[str, Any] = {"stage": name, "store": store.url(ctx.key(""))}
        if ctx.is_complete():
            summary = ctx.summary_of(name)
            row.update(state="done", detail=_summary_line(summary), summary=summary)
        else:
            module = load_stage(name)
            progress = getattr(module, "progress", None)
            done, total = progress(ctx) if progress else (sum(1 for _ in store.list(ctx.key(""))), None)
            if done:
                row.update(state="partial", done=done, total=total,
                           detail=f"{done}/{total} items" if total is not None else f"{done} objects written")
            else:
                row.update(state="not started", detail="")
        rows.append(row)
    return rows


def stage_states(config: RunConfig, store: ArtifactStore) -> dict[str, str]:
    """Each stage's state as ``stage_status`` has it, from its marker alone: ``_SUCCESS``, else the stage's
    ``started`` (a few HEADs and short listings), else whether its folder holds an object (one LIST call for
    one key). Never a listing of a run's records: what ``ielts-distill runs`` reads for every run."""
    states = {}
    for name in STAGES:
        ctx = StageContext(config=config, store=store, stage=name)
        if ctx.is_complete():
            states[name] = "done"
            continue
        module = load_stage(name)
        started = getattr(module, "started", None)
        progress = getattr(module, "progress", None)
        if started:
            begun = started(ctx)
        else:  # a stage without ``started`` is counted as ``stage_status`` counts it
            begun = progress(ctx)[0] > 0 if progress else any(store.list(ctx.key(""), limit=1))
        states[name] = "partial" if begun else "not started"
    return states


def executor_status(executor: Executor, rows: list[dict[str, Any]]) -> None:
    """Add where each unfinished stage is in ``executor`` (``Executor.status``: e.g. its Job) to ``rows``."""
    for row in rows:
        if row["state"] != "done":
            ctx = StageContext(config=executor.config, store=executor.store, stage=row["stage"])
            row["executor"] = executor.status(spec(row["stage"]), ctx)


__all__ = ["SUCCESS", "executor_status", "stage_states", "stage_status"]
