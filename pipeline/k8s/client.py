"""The Kubernetes API as the driver uses it: ``KubeBackend`` (apply, create, read, watch, pods, logs, delete in
one namespace; plain camelCase dicts back; every call bounded by a timeout, errors as one line), the client
loader (kube config or in-cluster) and ``LogFollower`` (pod logs streamed and resumed without repeats).
The pipeline logic on top of it is ``pipeline.executors.k8s``."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k
from kubernetes import config as kconfig
from kubernetes.client.rest import ApiException
from kubernetes.watch import Watch

from pipeline.errors import PipelineError
from pipeline.k8s.diagnose import event_time
from pipeline.k8s.diagnose import parse_time as _parse_time
from pipeline.k8s.objects import EXIT_API_OUTAGE

log = logging.getLogger("ielts_distill")
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


_TRANSIENT = (429, 500, 502, 503, 504)  # statuses of an API server restarting or overloaded


class ApiOutage(PipelineError):
    """The API stayed unreachable for longer than ``k8s.api_outage_s`` after the driver had reached it, or a
    write failed in transit: the stage Jobs keep running, and a rerun (the driver Job's next pod) re-attaches."""

    exit_code = EXIT_API_OUTAGE


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
        api = k.ApiClient(cfg)
        api.in_cluster = True  # no wrong context to fail fast on: a restarted driver pod rides out an outage at once
        return api
    raise PipelineError("no Kubernetes configuration: set KUBECONFIG (or ~/.kube/config, or --kubeconfig), "
                        "or run inside a cluster")


class KubeBackend:
    """The cluster calls the driver makes, in one namespace; objects come back as plain camelCase dicts.
    Every call has a timeout (``timeout_s``): a dead or silent API server fails in one line, never hangs. Once
    the API has answered, reads are retried with capped back-off through an outage of up to ``outage_s`` (a
    control-plane upgrade), then ``ApiOutage``; a write that fails in transit raises ``ApiOutage`` at once."""

    def __init__(self, namespace: str, api: k.ApiClient | None = None, timeout_s: float = 30.0,
                 outage_s: float = 600.0, notify: Callable[[str], None] = log.warning):
        self.namespace = namespace
        self.api = api or load_api_client()
        self.core = k.CoreV1Api(self.api)
        self.batch = k.BatchV1Api(self.api)
        self.timeout_s, self.outage_s, self.notify = timeout_s, outage_s, notify
        # an answer came once (or the API is the cluster's own): transport errors are an outage, not a wrong context
        self.reached = bool(getattr(self.api, "in_cluster", False))

    @property
    def host(self) -> str:
        return self.api.configuration.host

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, ok: tuple[int, ...] = (), write: bool = False,
              **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with a request timeout; API errors and unreachable servers as one line.
        Statuses in ``ok`` come back as the ApiException for the caller to handle."""
        timeout = kwargs.pop("_request_timeout", self.timeout_s)
        started, delay = None, 0.5
        while True:
            try:
                result = fn(*args, _request_timeout=timeout, **kwargs)
                if started is not None:
                    self.notify(f"the Kubernetes API at {self.host} answers again after "
                                f"{time.monotonic() - started:.0f}s")
                self.reached = True
                return result
            except ApiException as exc:
                if exc.status in ok:
                    self.reached = True
                    return exc
                if exc.status == 404 and "namespaces" in str(exc.body or "") and "not found" in str(exc.body or ""):
                    raise PipelineError(f"namespace '{self.namespace}' not found: apply k8s/overlays/local or "
                                        f"cloud first (or kubectl create namespace {self.namespace})") from None
                if exc.status not in _TRANSIENT:
                    raise _api_error(exc, what) from None
                error = _api_error(exc, what)
            except urllib3.exceptions.HTTPError as exc:
                error = self._transport_error(what, exc, timeout)
            if not self.reached:
                raise error from None
            if write:
                raise ApiOutage(f"{error}; the stage Jobs keep running: rerun to re-attach") from None
            if started is None:
                started = time.monotonic()
                self.notify(f"{error}: retrying for up to {self.outage_s:g}s (k8s.api_outage_s)")
            left = self.outage_s - (time.monotonic() - started)
            if left <= 0:
                raise ApiOutage(f"{error}; unreachable for {self.outage_s:g}s (k8s.api_outage_s); the stage Jobs "
                                "keep running: rerun to re-attach") from None
            time.sleep(min(delay, left))
            delay = min(delay * 2, 30.0)

    def _transport_error(self, what: str, exc: urllib3.exceptions.HTTPError, timeout: Any) -> PipelineError:
        inner = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
        if isinstance(inner, (urllib3.exceptions.TimeoutError, urllib3.exceptions.ProtocolError)) \
                and not isinstance(inner, urllib3.exceptions.NewConnectionError):  # (a ConnectTimeoutError subclass)
            seconds = timeout if isinstance(timeout, (int, float)) else self.timeout_s
            return PipelineError(f"{what}: the Kubernetes API at {self.host} did not answer within {seconds:g}s "
                                 f"(k8s.request_timeout_s): {_reason(inner)}")
        return PipelineError(f"{what}: cannot reach the Kubernetes API at {self.host}: {_reason(exc)}; "
                             "check the kube context (--context/--kubeconfig)")

    def _json_call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        return json.loads(self._call(what, fn, *args, _preload_content=False, **kwargs).data)

    def get(self, what: str, fn: Callable[..., Any], *args: Any) -> dict[str, Any] | ApiException:
        """An object as a dict, or the ApiException when it is missing (404) or out of reach (403)."""
        resp = self._call(what, fn, *args, ok=(403, 404), _preload_content=False)
        return resp if isinstance(resp, ApiException) else json.loads(resp.data)

    def allowed(self, verb: str, resource: str, group: str = "", subresource: str = "") -> bool:
        """Whether this client's own identity may ``verb`` the resource in the namespace (SelfSubjectAccessReview)."""
        attrs = {"namespace": self.namespace, "verb": verb, "group": group, "resource": resource,
                 "subresource": subresource}
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": attrs}}
        body = self._json_call(f"access review {verb} {resource}", k.AuthorizationV1Api(self.api)
                               .create_self_subject_access_review, review)
        return bool((body.get("status") or {}).get("allowed"))

    def read_configmap(self, name: str) -> dict[str, Any] | None:
        resp = self._call(f"read configmap {name}", self.core.read_namespaced_config_map, name, self.namespace,
                          ok=(404,), _preload_content=False)
        return None if isinstance(resp, ApiException) else json.loads(resp.data)

    def apply_configmap(self, cm: k.V1ConfigMap) -> None:
        name = cm.metadata.name
        resp = self._call(f"create configmap {name}", self.core.create_namespaced_config_map, self.namespace, cm,
                          ok=(404, 409), write=True)
        if isinstance(resp, ApiException) and resp.status == 404:
            raise PipelineError(f"namespace '{self.namespace}' not found: apply k8s/overlays/local or cloud "
                                f"first (or kubectl create namespace {self.namespace})")
        if isinstance(resp, ApiException):
            self._call(f"replace configmap {name}", self.core.replace_namespaced_config_map, name, self.namespace, cm,
                       write=True)

    def create_job(self, job: k.V1Job, attempts: int = 20, dry_run: bool = False) -> None:
        """Create ``job`` (``dry_run``: only let the API server validate and admit it)."""
        extra = {"dry_run": "All"} if dry_run else {}
        for attempt in range(attempts):
            resp = self._call(f"create job {job.metadata.name}" + (" (dry run)" if dry_run else ""),
                              self.batch.create_namespaced_job, self.namespace, job, ok=(409,), write=True, **extra)
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
            if exc.status in _TRANSIENT:  # the caller lists again (through the outage retries)
                return
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
                   propagation_policy="Background", ok=(404,), write=True)


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
            index = (pod["metadata"].get("labels") or {}).get(INDEX_LABEL)
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
