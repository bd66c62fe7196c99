"""The Kubernetes executor: one Job per stage, submitted in order, watched until it succeeds or fails.

Design: a small backend (``KubeBackend``: apply, create, read, watch, pods, logs, delete — the kubeflow
SDK's one-protocol lesson) under a driver that owns the pipeline logic (skip stages whose ``_SUCCESS`` is
in the store, wait with explicit success/failure conditions, re-list after 410 Gone, explain failures in
one line). The store stays the single source of truth, so ``ielts-distill status`` reads a cluster run
exactly like a local one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import urllib3
from kubernetes import client as k
from kubernetes import config as kconfig
from kubernetes.client.rest import ApiException
from kubernetes.watch import Watch

from pipeline.config import RunConfig
from pipeline.context import StageContext
from pipeline.errors import PipelineError
from pipeline.executors import base
from pipeline.executors.base import Executor, Outcome
from pipeline.k8s.diagnose import Verdict, job_verdict, pod_problem
from pipeline.k8s.objects import build_configmap, build_job, job_name, run_selector
from pipeline.stages import STAGES, StageSpec
from pipeline.store import SUCCESS, ArtifactStore

log = logging.getLogger("ielts_distill")
_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


class Gone(Exception):
    """The watch's resourceVersion expired (HTTP 410): list again, then watch from the new version."""


def _api_error(exc: ApiException, what: str) -> PipelineError:
    try:
        message = json.loads(exc.body or "{}").get("message") or exc.reason
    except (ValueError, AttributeError):
        message = exc.reason
    return PipelineError(f"{what}: Kubernetes API {exc.status} {message}")


def load_api_client() -> k.ApiClient:
    """From $KUBECONFIG (or ~/.kube/config), else the in-cluster service account."""
    path = os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    if os.environ.get("KUBECONFIG") or Path(path).is_file():
        try:  # read $KUBECONFIG now: the client's own default is fixed when it is imported
            return kconfig.new_client_from_config(config_file=path)
        except (kconfig.ConfigException, OSError) as exc:
            raise PipelineError(f"cannot load the kube config ($KUBECONFIG or ~/.kube/config): {exc}") from None
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = k.Configuration()
        kconfig.load_incluster_config(client_configuration=cfg)
        return k.ApiClient(cfg)
    raise PipelineError("no Kubernetes configuration: set KUBECONFIG (or ~/.kube/config), or run inside a cluster")


class KubeBackend:
    """The cluster calls the driver makes, in one namespace; objects come back as plain camelCase dicts."""

    def __init__(self, namespace: str, api: k.ApiClient | None = None):
        self.namespace = namespace
        self.api = api or load_api_client()
        self.core = k.CoreV1Api(self.api)
        self.batch = k.BatchV1Api(self.api)

    @staticmethod
    def _json(resp: Any) -> dict[str, Any]:
        return json.loads(resp.data)

    def apply_configmap(self, cm: k.V1ConfigMap) -> None:
        name = cm.metadata.name
        try:
            self.core.create_namespaced_config_map(self.namespace, cm)
        except ApiException as exc:
            if exc.status == 404:
                raise PipelineError(f"namespace '{self.namespace}' not found: apply k8s/overlays/local or cloud "
                                    f"first (or kubectl create namespace {self.namespace})") from None
            if exc.status != 409:
                raise _api_error(exc, f"create configmap {name}") from None
            try:
                self.core.replace_namespaced_config_map(name, self.namespace, cm)
            except ApiException as exc2:
                raise _api_error(exc2, f"replace configmap {name}") from None

    def create_job(self, job: k.V1Job, attempts: int = 20) -> None:
        for attempt in range(attempts):
            try:
                self.batch.create_namespaced_job(self.namespace, job)
                return
            except ApiException as exc:
                if exc.status != 409 or attempt == attempts - 1:  # 409: the old Job is still going away
                    raise _api_error(exc, f"create job {job.metadata.name}") from None
                time.sleep(0.5)

    def read_job(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        """(the Job or None, the list's resourceVersion to watch from)."""
        try:
            resp = self.batch.list_namespaced_job(self.namespace, field_selector=f"metadata.name={name}",
                                                  _preload_content=False)
        except ApiException as exc:
            raise _api_error(exc, f"list job {name}") from None
        body = self._json(resp)
        items = [j for j in body.get("items") or [] if j["metadata"]["name"] == name]
        return (items[0] if items else None), (body.get("metadata") or {}).get("resourceVersion")

    def list_jobs(self, selector: str) -> list[dict[str, Any]]:
        key, _, value = selector.partition("=")
        resp = self.batch.list_namespaced_job(self.namespace, label_selector=selector, _preload_content=False)
        return [j for j in self._json(resp).get("items") or []
                if (j["metadata"].get("labels") or {}).get(key) == value]

    def list_pods(self, job: str) -> list[dict[str, Any]]:
        try:
            resp = self.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={job}",
                                                 _preload_content=False)
        except ApiException as exc:
            raise _api_error(exc, f"list pods of job {job}") from None
        return [p for p in self._json(resp).get("items") or []
                if (p["metadata"].get("labels") or {}).get("job-name") == job]

    def watch_job(self, name: str, resource_version: str | None, window_s: float) -> Iterator[dict[str, Any] | None]:
        """Job states as they change for up to ``window_s``; None when the Job was deleted. Raises Gone."""
        watch = Watch()
        try:
            for event in watch.stream(self.batch.list_namespaced_job, self.namespace,
                                      field_selector=f"metadata.name={name}", resource_version=resource_version,
                                      timeout_seconds=max(1, math.ceil(window_s)),
                                      _request_timeout=(10, window_s)):
                obj = event["raw_object"]
                if obj["metadata"]["name"] == name:
                    yield None if event["type"] == "DELETED" else obj
        except ApiException as exc:
            if exc.status == 410:
                raise Gone() from None
            raise _api_error(exc, f"watch job {name}") from None
        except urllib3.exceptions.HTTPError:  # read timeout or dropped stream: the caller lists again
            return
        finally:
            watch.stop()

    def read_logs(self, pod: str, container: str) -> Iterator[str]:
        try:
            text = self.core.read_namespaced_pod_log(pod, self.namespace, container=container)
        except ApiException as exc:
            raise _api_error(exc, f"read the log of pod {pod}") from None
        yield from text.splitlines()

    def stream_logs(self, pod: str, container: str) -> Iterator[str]:
        resp = self.core.read_namespaced_pod_log(pod, self.namespace, container=container, follow=True,
                                                 _preload_content=False)
        try:
            pending = b""
            for chunk in resp.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                yield from (ln.decode("utf-8", "replace") for ln in lines)
            if pending:
                yield pending.decode("utf-8", "replace")
        finally:
            resp.release_conn()

    def delete_job(self, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise _api_error(exc, f"delete job {name}") from None


class LogFollower:
    """One thread per started pod, printing its log lines prefixed with the stage (and index)."""

    def __init__(self, backend: KubeBackend, stage: str, echo: Callable[[str], None]):
        self.backend, self.stage, self.echo = backend, stage, echo
        self.threads: dict[str, threading.Thread] = {}

    def follow(self, pods: list[dict[str, Any]]) -> None:
        for pod in pods:
            name = pod["metadata"]["name"]
            if name in self.threads or (pod.get("status") or {}).get("phase") in (None, "Pending", "Unknown"):
                continue
            index = (pod["metadata"].get("labels") or {}).get(_INDEX_LABEL)
            prefix = f"[{self.stage}{'/' + index if index is not None else ''}] "
            thread = threading.Thread(target=self._pump, args=(name, prefix), daemon=True, name=f"logs-{name}")
            self.threads[name] = thread
            thread.start()

    def _pump(self, pod: str, prefix: str) -> None:
        try:
            for line in self.backend.stream_logs(pod, self.stage):
                self.echo(prefix + line)
        except Exception as exc:  # logs are a convenience: never let them break the wait
            log.debug("log stream of %s ended: %s", pod, exc)

    def close(self, timeout_s: float = 5.0) -> None:
        """Let finished pods' streams drain, for ``timeout_s`` in all (running pods' threads are daemons)."""
        deadline = time.monotonic() + timeout_s
        for thread in self.threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))


def _owned_by(pod: dict[str, Any], job: dict[str, Any]) -> bool:
    """False for pods left over from an earlier Job of the same name (another controller uid)."""
    uid = (job.get("metadata") or {}).get("uid")
    labels = (pod.get("metadata") or {}).get("labels") or {}
    owner = labels.get("batch.kubernetes.io/controller-uid") or labels.get("controller-uid")
    return not uid or not owner or owner == uid


class KubeExecutor(Executor):
    """One Job per stage: submit (or attach to a running one), wait, explain a failure in one line."""

    def __init__(self, config: RunConfig, store: ArtifactStore | None = None,
                 echo: Callable[[str], None] = click.echo, backend: KubeBackend | None = None):
        for stage in STAGES:  # every object builds (config errors surface) before the store is opened
            build_job(config, stage)
        super().__init__(config, store, echo)
        self.ns = config.k8s.namespace
        self._backend = backend

    @property
    def backend(self) -> KubeBackend:
        if self._backend is None:
            self._backend = KubeBackend(self.ns)
        return self._backend

    def prepare(self, specs: Sequence[StageSpec], force: bool) -> None:
        super().prepare(specs, force)
        if force or any(not StageContext(config=self.config, store=self.store, stage=s.name).is_complete()
                        for s in specs):
            self.backend.apply_configmap(build_configmap(self.config))

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
        for pod in self.backend.list_pods(job_name(self.config, spec.name)):
            yield from self.backend.read_logs(pod["metadata"]["name"], spec.name)

    def cancel(self, spec: StageSpec, ctx: StageContext) -> bool:
        name = job_name(self.config, spec.name)
        job, _ = self.backend.read_job(name)
        if job is None or job_verdict(job) is not None:
            return False
        self.backend.delete_job(name)
        return True

    def wait(self, stage: str, name: str) -> Verdict:
        """Until the Job succeeds or fails, a pod is stuck, or k8s.wait_timeout_s passes."""
        kc = self.config.k8s
        deadline = time.monotonic() + kc.wait_timeout_s
        logs = LogFollower(self.backend, stage, self.echo)
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
                if time.monotonic() > deadline:
                    return Verdict(False, "Timeout", f"not finished after {kc.wait_timeout_s}s (k8s.wait_timeout_s); "
                                                     "the job keeps running")
                try:
                    for state in self.backend.watch_job(name, rv, kc.poll_s):
                        job = state
                        if state is None or job_verdict(state):
                            break
                        rv = state["metadata"].get("resourceVersion") or rv
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


def run_pipeline(config: RunConfig, stages: Sequence[str], force: bool = False, cleanup: bool = False,
                 backend: KubeBackend | None = None, echo: Callable[[str], None] = click.echo) -> ArtifactStore:
    """Submit one Job per stage in order and wait for each; stages complete in the store are skipped."""
    return base.run_pipeline(KubeExecutor(config, echo=echo, backend=backend), stages, force=force, cleanup=cleanup)
