"""The Kubernetes executor: one Job per stage, submitted in order, watched until it succeeds or fails.

Design: a small backend (``pipeline.k8s.client.KubeBackend``: apply, create, read, watch, pods, logs,
delete — the kubeflow SDK's one-protocol lesson) under a driver that owns the pipeline logic (skip stages whose ``_SUCCESS`` is
in the store, wait with explicit success/failure conditions, re-list after 410 Gone, explain failures in
one line). The store stays the single source of truth, so ``ielts-distill status`` reads a cluster run
exactly like a local one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click
import urllib3
from kubernetes.client.rest import ApiException

from pipeline.config import RunConfig
from pipeline.context import StageContext
from pipeline.errors import PipelineError
from pipeline.executors import base
from pipeline.executors.base import Executor, Outcome
from pipeline.k8s.client import INDEX_LABEL, Gone, KubeBackend, LogFollower, load_api_client
from pipeline.k8s.diagnose import Verdict, event_verdict, job_verdict, pod_problem, waiting_notes
from pipeline.k8s.objects import (
    build_configmap,
    build_driver_job,
    build_job,
    driver_job_name,
    job_name,
    run_selector,
    to_dict,
)
from pipeline.k8s.preflight import DRIVER_RIGHTS, SUBMIT_RIGHTS, preflight
from pipeline.stages import STAGES, StageSpec
from pipeline.store import SUCCESS, ArtifactStore

log = logging.getLogger("ielts_distill")
__all__ = ["KubeBackend", "KubeExecutor", "load_api_client", "run_pipeline", "submit"]


def _owned_by(pod: dict[str, Any], job: dict[str, Any]) -> bool:
    """False for pods left over from an earlier Job of the same name (another controller uid)."""
    uid = (job.get("metadata") or {}).get("uid")
    labels = (pod.get("metadata") or {}).get("labels") or {}
    owner = labels.get("batch.kubernetes.io/controller-uid") or labels.get("controller-uid")
    return not uid or not owner or owner == uid


class KubeExecutor(Executor):
    """One Job per stage: submit (or attach to a running one), wait, explain a failure in one line."""

    def __init__(self, config: RunConfig, store: ArtifactStore | None = None,
                 echo: Callable[[str], None] = click.echo, backend: KubeBackend | None = None,
                 kubeconfig: str | None = None, context: str | None = None):
        for stage in STAGES:  # every object builds (config errors surface) before the store is opened
            build_job(config, stage)
        super().__init__(config, store, echo)
        self.ns = config.k8s.namespace
        self.backend = backend or KubeBackend(self.ns, load_api_client(kubeconfig, context),
                                              config.k8s.request_timeout_s, config.k8s.api_outage_s)
        self.backend.notify = echo

    def prepare(self, specs: Sequence[StageSpec], force: bool) -> None:
        """Dry-run every Job still to run on the server (admission, quota names, schema: a typo fails now,
        not hours later), then apply the run's ConfigMap, unless a Job of this run is running on it."""
        super().prepare(specs, force)
        todo = [s for s in specs if force or not StageContext(config=self.config, store=self.store,
                                                              stage=s.name).is_complete()]
        if not todo:
            return
        if self.config.k8s.preflight:
            self.check([to_dict(build_job(self.config, s.name)) for s in todo], DRIVER_RIGHTS)
        if self.config.k8s.dry_run:
            for s in todo:
                self.backend.create_job(build_job(self.config, s.name), dry_run=True)
        self.apply_config(force)

    def preflight(self, jobs: list[dict[str, Any]], rights=DRIVER_RIGHTS) -> tuple[list[str], list[str]]:
        kc = self.config.k8s
        s3 = {kc.s3_secret: ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")} if self.config.store.uri.startswith("s3://") \
            else {}
        return preflight(self.backend, jobs, kc.gpu_resource, rights, s3)

    def check(self, jobs: list[dict[str, Any]], rights=DRIVER_RIGHTS) -> None:
        """Preflight before any Job is created: each problem one line, then stop."""
        problems, notes = self.preflight(jobs, rights)
        for line in notes:
            self.echo(f"preflight: note: {line}")
        for line in problems:
            self.echo(f"preflight: {line}")
        if problems:
            raise PipelineError(f"preflight: {len(problems)} problem(s) above; no Job was created "
                                "(k8s.preflight=false skips the checks)")

    def apply_config(self, force: bool) -> None:
        """The run's ConfigMap, unless a Job of this run is running on another version of it."""
        cm = build_configmap(self.config)
        current = self.backend.read_configmap(cm.metadata.name)
        if current is not None and (current.get("data") or {}) == cm.data:
            return
        running = [j["metadata"]["name"] for j in self.backend.list_jobs(run_selector(self.config))
                   if job_verdict(j) is None and j["metadata"]["name"] != driver_job_name(self.config)]
        if current is not None and running and not force:
            raise PipelineError(f"job {running[0]} of run {self.config.run.id} is running with another config: "
                                "its pods would read the new one on restart. Wait for it, or rerun with --force "
                                f"(or delete it: kubectl -n {self.ns} delete job {running[0]})")
        self.backend.apply_configmap(cm)

    def run_stage(self, spec: StageSpec, ctx: StageContext) -> Outcome:
        stage, name = spec.name, job_name(self.config, spec.name)
        existing, _ = self.backend.read_job(name)
        if existing is not None and job_verdict(existing) is None and not self.force:
            self.echo(f"[{stage}] job {name} is already running: attaching to it")
        else:
            if existing is not None:
                self.backend.delete_job(name)  # a finished (or forced) Job of an earlier attempt
            self.backend.create_job(build_job(self.config, stage))
            self.echo(f"[{stage}] submitted job {name} (namespace {self.ns})")
        verdict = self.wait(stage, name)
        if not verdict.ok:
            return Outcome(stage, False, "failed", verdict.line(stage, self.ns, name))
        if not ctx.is_complete():
            return Outcome(stage, False, "failed", f"stage {stage}: job {name} succeeded but "
                           f"{self.store.url(ctx.key(SUCCESS))} is missing; inspect: kubectl -n {self.ns} logs job/{name}")
        self.echo(f"[{stage}] complete")
        return Outcome(stage, True, "complete", self.store.url(ctx.key(SUCCESS)))

    def status(self, spec: StageSpec, ctx: StageContext) -> str:
        name = job_name(self.config, spec.name)
        job, _ = self.backend.read_job(name)
        if job is None:
            return f"no job {name}"
        verdict = job_verdict(job)
        if verdict is not None:
            return f"job {name}: {'complete' if verdict.ok else 'failed: ' + verdict.reason}"
        st = job.get("status") or {}
        return f"job {name}: running (active {st.get('active', 0)}, succeeded {st.get('succeeded', 0)}, " \
               f"failed {st.get('failed', 0)})"

    def logs(self, spec: StageSpec, ctx: StageContext) -> Iterator[str]:
        """The log of each pod of the stage's Job that still exists (``ctx.shard``: that index's pods only)."""
        for pod in self.backend.list_pods(job_name(self.config, spec.name)):
            index = (pod["metadata"].get("labels") or {}).get(INDEX_LABEL)
            if ctx.shard.whole or index == str(ctx.shard.index):
                yield from self.backend.read_logs(pod["metadata"]["name"], spec.name)

    def cancel_run(self) -> list[str]:
        """Delete every Job of the run, the driver's first (so it starts no more); the store is kept."""
        jobs = sorted((j["metadata"]["name"] for j in self.backend.list_jobs(run_selector(self.config))),
                      key=lambda name: name != driver_job_name(self.config))
        for name in jobs:
            self.backend.delete_job(name)
        return jobs

    def cancel(self, spec: StageSpec, ctx: StageContext) -> bool:
        name = job_name(self.config, spec.name)
        job, _ = self.backend.read_job(name)
        if job is None or job_verdict(job) is not None:
            return False
        self.backend.delete_job(name)
        return True

    def wait(self, stage: str, name: str) -> Verdict:
        """Until the Job succeeds or fails, a pod is stuck, an Event is fatal, or k8s.wait_timeout_s passes.
        Queued (Kueue), waiting for a node or a scale-up, and evicted pods are reported once each, not failed."""
        kc = self.config.k8s
        deadline = time.monotonic() + kc.wait_timeout_s
        logs = LogFollower(self.backend, stage, self.echo)
        said: set[str] = set()
        job, rv = None, None
        try:
            while True:
                if job is None:  # (re-)list: the authoritative state and a fresh resourceVersion
                    job, rv = self.backend.read_job(name)
                    if job is None:
                        return Verdict(False, "Deleted", "the job was deleted while the driver waited for it")
                pods = [p for p in self.backend.list_pods(name) if _owned_by(p, job)]
                logs.follow(pods)
                verdict = job_verdict(job, pods) or next(
                    (v for v in (pod_problem(p, kc.pending_grace_s) for p in pods) if v), None)
                if verdict:
                    return verdict
                events = self.backend.list_events({name, *(p["metadata"]["name"] for p in pods)}, f"job-{name}-")
                verdict = event_verdict(events, job, pods, kc.pending_grace_s)
                if verdict:
                    return verdict
                notes = waiting_notes(events, job, pods)
                for note in notes:
                    if note not in said:
                        said.add(note)
                        self.echo(f"[{stage}] {note}")
                if time.monotonic() > deadline:
                    still = f"; still {notes[-1]}" if notes else ""
                    return Verdict(False, "Timeout", f"not finished after {kc.wait_timeout_s}s (k8s.wait_timeout_s)"
                                                     f"{still}; the job keeps running")
                try:  # until the Job changes (then look at pods and Events again) or poll_s passes
                    for state in self.backend.watch_job(name, rv, kc.poll_s):
                        job = state
                        if state is not None:
                            rv = state["metadata"].get("resourceVersion") or rv
                        break
                except Gone:
                    log.debug("watch of %s: 410 Gone, listing again", name)
                    job = None
        finally:
            logs.close()

    def interrupted(self, specs: Sequence[StageSpec], cleanup: bool) -> None:
        """After Ctrl-C: say which Jobs still run, or delete them (--cleanup)."""
        selector = run_selector(self.config)
        try:
            running = [j["metadata"]["name"] for j in self.backend.list_jobs(selector) if job_verdict(j) is None]
        except (ApiException, PipelineError, urllib3.exceptions.HTTPError) as exc:
            self.echo(f"could not list this run's jobs ({exc}); check: kubectl -n {self.ns} get jobs -l {selector}")
            return
        if not running:
            self.echo("no jobs of this run are still running")
            return
        for name in running:
            if cleanup:
                self.backend.delete_job(name)
                self.echo(f"deleted job {name} (its finished per-item records stay in the store)")
            else:
                self.echo(f"still running: job {name} (kubectl -n {self.ns} get job {name})")
        if not cleanup:
            self.echo(f"rerun the same command to re-attach, or delete them: kubectl -n {self.ns} delete job "
                      f"-l {selector} (or rerun with --cleanup)")


def submit(executor: KubeExecutor, run_args: list[str], force: bool = False) -> str:
    """Start the driver as a Job in the cluster (``ielts-distill submit``); returns its name. A driver Job of
    this run that is still running is an error (follow it instead); a finished one is replaced."""
    config, backend, ns = executor.config, executor.backend, executor.ns
    job = build_driver_job(config, run_args)
    name = job.metadata.name
    if config.k8s.preflight:  # the stage Jobs' references too: the driver would stop on them in the cluster
        executor.check([to_dict(job), *(to_dict(build_job(config, s)) for s in STAGES)], SUBMIT_RIGHTS)
    existing, _ = backend.read_job(name)
    if existing is not None and job_verdict(existing) is None:
        raise PipelineError(f"driver job {name} is already running: kubectl -n {ns} logs -f job/{name} "
                            f"(or delete it: kubectl -n {ns} delete job {name})")
    if config.k8s.dry_run:
        backend.create_job(job, dry_run=True)
    executor.apply_config(force)
    if existing is not None:
        backend.delete_job(name)
    backend.create_job(job)
    return name


def run_pipeline(config: RunConfig, stages: Sequence[str], force: bool = False, cleanup: bool = False,
                 backend: KubeBackend | None = None, echo: Callable[[str], None] = click.echo) -> ArtifactStore:
    """Submit one Job per stage in order and wait for each; stages complete in the store are skipped."""
    return base.run_pipeline(KubeExecutor(config, echo=echo, backend=backend), stages, force=force, cleanup=cleanup)
