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
from datetime import datetime, timezone
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
from pipeline.k8s.diagnose import Verdict, event_time, event_verdict, job_verdict, pod_problem, waiting_notes
from pipeline.k8s.diagnose import parse_time as _parse_time
from pipeline.k8s.objects import build_configmap, build_driver_job, build_job, driver_job_name, job_name, run_selector
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


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> k.ApiClient:
    """From ``kubeconfig`` (else $KUBECONFIG, else ~/.kube/config) and ``context`` (else its current one),
    else the in-cluster service account."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    cfg = k.Configuration()
    # a refused connection is retried briefly (an API server restarting); a silent one is not (read=0)
    cfg.retries = urllib3.util.Retry(total=3, connect=3, read=0, backoff_factor=0.5)
    if kubeconfig or os.environ.get("KUBECONFIG") or Path(path).is_file() or context:
        try:  # read the file now: the client's own default is fixed when it is imported
            kconfig.load_kube_config(config_file=path, context=context, client_configuration=cfg)
        except (kconfig.ConfigException, OSError) as exc:
            raise PipelineError(f"cannot load the kube config {path}"
                                + (f" (context {context})" if context else "") + f": {exc}") from None
        return k.ApiClient(cfg)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        kconfig.load_incluster_config(client_configuration=cfg)
        return k.ApiClient(cfg)
    raise PipelineError("no Kubernetes configuration: set KUBECONFIG (or ~/.kube/config, or --kubeconfig), "
                        "or run inside a cluster")


class KubeBackend:
    """The cluster calls the driver makes, in one namespace; objects come back as plain camelCase dicts.
    Every call has a timeout (``timeout_s``): a dead or silent API server fails in one line, never hangs."""

    def __init__(self, namespace: str, api: k.ApiClient | None = None, timeout_s: float = 30.0):
        self.namespace = namespace
        self.api = api or load_api_client()
        self.core = k.CoreV1Api(self.api)
        self.batch = k.BatchV1Api(self.api)
        self.timeout_s = timeout_s

    @property
    def host(self) -> str:
        return self.api.configuration.host

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, ok: tuple[int, ...] = (), **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with a request timeout; API errors and unreachable servers as one line.
        Statuses in ``ok`` come back as the ApiException for the caller to handle."""
        try:
            return fn(*args, _request_timeout=kwargs.pop("_request_timeout", self.timeout_s), **kwargs)
        except ApiException as exc:
            if exc.status in ok:
                return exc
            if exc.status == 404 and "namespaces" in str(exc.body or "") and "not found" in str(exc.body or ""):
                raise PipelineError(f"namespace '{self.namespace}' not found: apply k8s/overlays/local or cloud "
                                    f"first (or kubectl create namespace {self.namespace})") from None
            raise _api_error(exc, what) from None
        except (urllib3.exceptions.TimeoutError, urllib3.exceptions.ProtocolError) as exc:
            raise PipelineError(f"{what}: the Kubernetes API at {self.host} did not answer within "
                                f"{self.timeout_s:g}s (k8s.request_timeout_s): {_reason(exc)}") from None
        except urllib3.exceptions.HTTPError as exc:
            raise PipelineError(f"{what}: cannot reach the Kubernetes API at {self.host}: {_reason(exc)}; "
                                "check the kube context (--context/--kubeconfig)") from None

    def _json_call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        return json.loads(self._call(what, fn, *args, _preload_content=False, **kwargs).data)

    def read_configmap(self, name: str) -> dict[str, Any] | None:
        resp = self._call(f"read configmap {name}", self.core.read_namespaced_config_map, name, self.namespace,
                          ok=(404,), _preload_content=False)
        return None if isinstance(resp, ApiException) else json.loads(resp.data)

    def apply_configmap(self, cm: k.V1ConfigMap) -> None:
        name = cm.metadata.name
        resp = self._call(f"create configmap {name}", self.core.create_namespaced_config_map, self.namespace, cm,
                          ok=(404, 409))
        if isinstance(resp, ApiException) and resp.status == 404:
            raise PipelineError(f"namespace '{self.namespace}' not found: apply k8s/overlays/local or cloud "
                                f"first (or kubectl create namespace {self.namespace})")
        if isinstance(resp, ApiException):
            self._call(f"replace configmap {name}", self.core.replace_namespaced_config_map, name, self.namespace, cm)

    def create_job(self, job: k.V1Job, attempts: int = 20, dry_run: bool = False) -> None:
        """Create ``job`` (``dry_run``: only let the API server validate and admit it)."""
        extra = {"dry_run": "All"} if dry_run else {}
        for attempt in range(attempts):
            resp = self._call(f"create job {job.metadata.name}" + (" (dry run)" if dry_run else ""),
                              self.batch.create_namespaced_job, self.namespace, job, ok=(409,), **extra)
            if not isinstance(resp, ApiException) or dry_run:  # dry run: an existing Job was admitted before
                return
            if attempt == attempts - 1:  # 409: the old Job is still going away
                raise _api_error(resp, f"create job {job.metadata.name}")
            time.sleep(0.5)

    def read_job(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        """(the Job or None, the list's resourceVersion to watch from)."""
        body = self._json_call(f"list job {name}", self.batch.list_namespaced_job, self.namespace,
                               field_selector=f"metadata.name={name}")
        items = [j for j in body.get("items") or [] if j["metadata"]["name"] == name]
        return (items[0] if items else None), (body.get("metadata") or {}).get("resourceVersion")

    def list_jobs(self, selector: str) -> list[dict[str, Any]]:
        key, _, value = selector.partition("=")
        body = self._json_call(f"list jobs {selector}", self.batch.list_namespaced_job, self.namespace,
                               label_selector=selector)
        return [j for j in body.get("items") or [] if (j["metadata"].get("labels") or {}).get(key) == value]

    def list_pods(self, job: str) -> list[dict[str, Any]]:
        body = self._json_call(f"list pods of job {job}", self.core.list_namespaced_pod, self.namespace,
                               label_selector=f"job-name={job}")
        return [p for p in body.get("items") or [] if (p["metadata"].get("labels") or {}).get("job-name") == job]

    def list_events(self, names: set[str], prefix: str) -> list[dict[str, Any]]:
        """Events about the objects named ``names`` or starting with ``prefix`` (the Job, its pods, its Kueue
        Workload ``job-<job>-<hash>``), oldest first."""
        body = self._json_call("list events", self.core.list_namespaced_event, self.namespace)
        events = [e for e in body.get("items") or []
                  if (e.get("involvedObject") or {}).get("name") in names
                  or str((e.get("involvedObject") or {}).get("name", "")).startswith(prefix)]
        return sorted(events, key=event_time)

    def watch_job(self, name: str, resource_version: str | None, window_s: float) -> Iterator[dict[str, Any] | None]:
        """Job states as they change for up to ``window_s``; None when the Job was deleted. Raises Gone."""
        watch = Watch()
        try:
            for event in watch.stream(self.batch.list_namespaced_job, self.namespace,
                                      field_selector=f"metadata.name={name}", resource_version=resource_version,
                                      timeout_seconds=max(1, math.ceil(window_s)),
                                      _request_timeout=(self.timeout_s, window_s + self.timeout_s)):
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
        resp = self._call(f"read the log of pod {pod}", self.core.read_namespaced_pod_log, pod, self.namespace,
                          container=container, _preload_content=False)
        yield from resp.data.decode("utf-8", "replace").splitlines()

    def stream_logs(self, pod: str, container: str, since_s: int | None = None) -> Iterator[str]:
        """Timestamped lines (``<RFC3339> <text>``), following until the stream ends."""
        since = {"since_seconds": since_s} if since_s else {}  # a quiet pod's stream times out: resumed later
        resp = self.core.read_namespaced_pod_log(pod, self.namespace, container=container, follow=True,
                                                 timestamps=True, _preload_content=False,
                                                 _request_timeout=(self.timeout_s, 300), **since)
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
        self._call(f"delete job {name}", self.batch.delete_namespaced_job, name, self.namespace,
                   propagation_policy="Background", ok=(404,))


def _reason(exc: Exception) -> str:
    """The innermost reason of a urllib3 error, e.g. 'Connection refused'."""
    inner = getattr(exc, "reason", None) or exc
    text = str(inner)
    return text.rsplit(": ", 1)[-1] if "Errno" in text or "Failed to establish" in text else text


class LogFollower:
    """One thread per started pod, printing its log lines prefixed with the stage (and index). A stream that
    drops while the pod runs is opened again from the last line seen (timestamps), without repeating lines;
    a finished pod's stream is read to its end once more."""

    def __init__(self, backend: KubeBackend, stage: str, echo: Callable[[str], None]):
        self.backend, self.stage, self.echo = backend, stage, echo
        self.threads: dict[str, threading.Thread] = {}
        self.last: dict[str, tuple[str, int]] = {}  # pod -> (last timestamp, lines printed with it)
        self.final: set[str] = set()

    def follow(self, pods: list[dict[str, Any]]) -> None:
        for pod in pods:
            name = pod["metadata"]["name"]
            phase = (pod.get("status") or {}).get("phase")
            if phase in (None, "Pending", "Unknown") or name in self.final:
                continue
            thread = self.threads.get(name)
            if thread is not None and thread.is_alive():
                continue
            if thread is not None and phase in ("Succeeded", "Failed"):
                self.final.add(name)  # one last read to the end of a finished pod's log
            index = (pod["metadata"].get("labels") or {}).get(_INDEX_LABEL)
            prefix = f"[{self.stage}{'/' + index if index is not None else ''}] "
            thread = threading.Thread(target=self._pump, args=(name, prefix), daemon=True, name=f"logs-{name}")
            self.threads[name] = thread
            thread.start()

    def _pump(self, pod: str, prefix: str) -> None:
        start_stamp, start_count = self.last.get(pod, ("", 0))
        since = None
        if start_stamp:  # resume: a little before the last line seen, then skip what was printed
            age = datetime.now(timezone.utc) - _parse_time(start_stamp)
            since = max(1, math.ceil(age.total_seconds()) + 1)
        same = 0  # lines of this stream stamped start_stamp
        try:
            for line in self.backend.stream_logs(pod, self.stage, since):
                stamp, _, text = line.partition(" ")
                if stamp < start_stamp:
                    continue
                if stamp == start_stamp:
                    same += 1
                    if same <= start_count:
                        continue
                last, count = self.last.get(pod, ("", 0))
                self.last[pod] = (stamp, count + 1 if stamp == last else 1)
                self.echo(prefix + text)
        except Exception as exc:  # noqa: BLE001 - logs are a convenience: never let them break the wait
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
                 echo: Callable[[str], None] = click.echo, backend: KubeBackend | None = None,
                 kubeconfig: str | None = None, context: str | None = None):
        for stage in STAGES:  # every object builds (config errors surface) before the store is opened
            build_job(config, stage)
        super().__init__(config, store, echo)
        self.ns = config.k8s.namespace
        self.backend = backend or KubeBackend(self.ns, load_api_client(kubeconfig, context),
                                              config.k8s.request_timeout_s)

    def prepare(self, specs: Sequence[StageSpec], force: bool) -> None:
        """Dry-run every Job still to run on the server (admission, quota names, schema: a typo fails now,
        not hours later), then apply the run's ConfigMap, unless a Job of this run is running on it."""
        super().prepare(specs, force)
        todo = [s for s in specs if force or not StageContext(config=self.config, store=self.store,
                                                              stage=s.name).is_complete()]
        if not todo:
            return
        if self.config.k8s.dry_run:
            for s in todo:
                self.backend.create_job(build_job(self.config, s.name), dry_run=True)
        self.apply_config(force)

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
                for note in waiting_notes(events, job, pods):
                    if note not in said:
                        said.add(note)
                        self.echo(f"[{stage}] {note}")
                if time.monotonic() > deadline:
                    return Verdict(False, "Timeout", f"not finished after {kc.wait_timeout_s}s (k8s.wait_timeout_s); "
                                                     "the job keeps running")
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
