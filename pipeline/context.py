"""What a stage gets to work with: the run config, the artifact store, its shard, and key helpers."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import MissingInput, PipelineError
from pipeline.records import RecordSet, Shard
from pipeline.stages import LLM_SPECS, StageSpec, spec
from pipeline.store import SUCCESS, ArtifactStore, open_store, pool_size_for


@dataclass
class StageContext:
    config: RunConfig
    store: ArtifactStore
    stage: str
    shard: Shard = field(default_factory=Shard)

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"ielts_distill.{self.stage}")

    @property
    def run_id(self) -> str:
        return self.config.run.id

    def key(self, *parts: str) -> str:
        """A key under this stage's own folder: ``<run.id>/<stage>/<parts...>``."""
        return "/".join((self.run_id, self.stage, *parts))

    @property
    def spec(self) -> StageSpec:
        return spec(self.stage)

    def input_key(self, stage: str, *parts: str) -> str:
        """A key under an upstream stage's folder (read-only). Only the stages in this stage's spec ``inputs``
        may be read: another one is a missing declaration, refused with one line."""
        if stage != self.stage and stage not in self.spec.inputs:
            raise PipelineError(f"stage '{self.stage}' reads stage '{stage}' but does not declare it: add "
                                f"'{stage}' to its StageSpec inputs (pipeline/stages/__init__.py)")
        return "/".join((self.run_id, stage, *parts))

    def require(self, *stages: str) -> None:
        """Fail with one line when an upstream stage (default: every declared input) has not completed."""
        for stage in stages or self.spec.inputs:
            if not self.store.exists(self.input_key(stage, SUCCESS)):
                raise MissingInput(f"stage '{self.stage}' needs stage '{stage}' to have completed "
                                 f"(no {self.store.url(self.input_key(stage, SUCCESS))}); "
                                 f"run: ielts-distill stage {stage}")

    def records(self, *sub: str) -> RecordSet:
        return RecordSet(self.store, self.key("records", *sub))

    def is_complete(self) -> bool:
        return self.store.exists(self.key(SUCCESS))

    def complete(self, summary: dict[str, Any] | None = None) -> None:
        """Mark the stage done. Write it last: everything else the stage wrote must already exist."""
        body = {"stage": self.stage, "run_id": self.run_id,
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "summary": summary or {}}
        self.store.put_text(self.key(SUCCESS), json.dumps(body, indent=1) + "\n")

    def collect_if_complete(self, output: str, groups: Sequence[tuple[RecordSet, Sequence[str]]],
                            summarize: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> bool:
        """The end of a stage sharded over items: once every item of every group has a record (this shard's
        and the others'), write all records in order to ``output`` and complete with ``summarize(rows)``.
        Returns False (and logs how far it got) while other shards are still working."""
        total = sum(len(ids) for _, ids in groups)
        missing = sum(len(records.pending(ids)) for records, ids in groups)
        if missing:
            self.log.info("%s: %d of %d records exist; other shards are still running", self.stage,
                          total - missing, total)
            return False
        rows = [row for records, ids in groups for row in records.read_all(ids)]
        self.store.put_jsonl(self.key(output), rows)
        self.complete(summarize(rows))
        return True

    def summary_of(self, stage: str) -> dict[str, Any]:
        """The summary an upstream stage wrote into its ``_SUCCESS``."""
        return json.loads(self.store.get_text(self.input_key(stage, SUCCESS))).get("summary", {})


def store_for(config: RunConfig) -> ArtifactStore:
    """The run's store, its connection pool sized for the LLM stages' concurrency."""
    calls = pool_size_for(max(config.endpoint(s.llm).concurrency for s in LLM_SPECS))
    return open_store(config.store.uri, endpoint_url=config.store.endpoint_url, region=config.store.region,
                      pool_size=calls)
