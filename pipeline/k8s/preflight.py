"""Before any Job is created: is everything the run's Jobs reference there, and may this identity do what it
must? ``ielts-distill preflight`` prints the result; ``run --executor k8s`` and ``submit`` stop on it.

The checks read the Jobs as built (``pipeline.k8s.objects``), so they name exactly what the pods would wait
for or fail on: the namespace, ServiceAccounts, Secrets and the keys the Jobs read from them (values are
never read into any message), PVCs, the Kueue LocalQueue of the queue label, a node offering the GPU resource
the Jobs request, and this identity's own rights (SelfSubjectAccessReview). Each missing thing is one line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from kubernetes import client as k
from kubernetes.client.rest import ApiException

from pipeline.k8s.client import KubeBackend
from pipeline.k8s.objects import QUEUE_LABEL

RBAC = "k8s/base/driver-rbac.yaml"
# (verb, API group, resource, subresource) the driver uses (pipeline.k8s.client); submit needs the first six
DRIVER_RIGHTS = (("create", "batch", "jobs", ""), ("list", "batch", "jobs", ""), ("delete", "batch", "jobs", ""),
                 ("get", "", "configmaps", ""), ("create", "", "configmaps", ""), ("update", "", "configmaps", ""),
                 ("watch", "batch", "jobs", ""), ("list", "", "pods", ""), ("get", "", "pods", "log"),
                 ("list", "", "events", ""))
SUBMIT_RIGHTS = DRIVER_RIGHTS[:6]
KUEUE = ("kueue.x-k8s.io", "v1beta1", "localqueues")


def _refs(jobs: Iterable[dict[str, Any]], gpu_resource: str) -> dict[str, Any]:
    """What the Jobs' pods reference: {accounts, secrets: {name: {key: optional}}, optional_secrets, claims,
    pull_secrets, queues, gpus: {resource: [stage]}}."""
    refs: dict[str, Any] = {"accounts": {}, "secrets": {}, "claims": {}, "queues": {}, "gpus": {}}
    for job in jobs:
        name = job["metadata"]["name"]
        pod = job["spec"]["template"]["spec"]
        if pod.get("serviceAccountName"):
            refs["accounts"].setdefault(pod["serviceAccountName"], name)
        queue = (job["metadata"].get("labels") or {}).get(QUEUE_LABEL)
        if queue:
            refs["queues"].setdefault(queue, name)
        for volume in pod.get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim:
                refs["claims"].setdefault(claim, name)
        for pull in pod.get("imagePullSecrets") or []:
            refs["secrets"].setdefault(pull["name"], {"job": name, "keys": {}})
        for container in pod.get("containers") or []:
            for source in container.get("envFrom") or []:
                ref = source.get("secretRef")
                if ref and not ref.get("optional"):
                    refs["secrets"].setdefault(ref["name"], {"job": name, "keys": {}})
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    refs["secrets"].setdefault(ref["name"], {"job": name, "keys": {}})["keys"].setdefault(ref["key"], name)
            if str(((container.get("resources") or {}).get("requests") or {}).get(gpu_resource, "0")) != "0":
                refs["gpus"].setdefault(gpu_resource, []).append(name)
    return refs


def _message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or "")
    except (ValueError, AttributeError):
        return str(exc.body or "")


def _missing(found: dict[str, Any] | ApiException) -> bool:
    return isinstance(found, ApiException) and found.status == 404


def _forbidden(found: dict[str, Any] | ApiException) -> bool:
    return isinstance(found, ApiException) and found.status == 403


def preflight(backend: KubeBackend, jobs: list[dict[str, Any]], gpu_resource: str, rights=DRIVER_RIGHTS,
              s3_keys: dict[str, tuple[str, ...]] | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes): one line per missing thing, and one per thing this identity may not look at.
    ``s3_keys``: keys a Secret must hold although the Jobs take it whole (envFrom), e.g. the S3 credentials."""
    ns, core, problems, notes = backend.namespace, backend.core, [], []
    # every namespace holds the root CA ConfigMap (Kubernetes >= 1.20): readable with the driver's namespaced Role
    found = backend.get("read configmap kube-root-ca.crt", core.read_namespaced_config_map, "kube-root-ca.crt", ns)
    if _missing(found):
        return [f"namespace {ns} does not exist: apply k8s/overlays/local or cloud (kubectl apply -k ...)"], notes
    for verb, group, resource, sub in rights:
        if not backend.allowed(verb, resource, group, sub):
            what = f"{resource}{'/' + sub if sub else ''}{'.' + group if group else ''}"
            problems.append(f"permission: this identity may not {verb} {what} in namespace {ns} (see {RBAC})")
    refs = _refs(jobs, gpu_resource)

    def read(kind: str, fn, name: str, where: str) -> dict[str, Any] | None:
        found = backend.get(f"read {kind} {name}", fn, name, ns)
        if _missing(found):
            problems.append(f"{kind} {name} not found in {ns} ({where})")
        elif _forbidden(found):
            notes.append(f"cannot check {kind} {name}: forbidden (see {RBAC})")
        return None if isinstance(found, ApiException) else found

    for account, job in refs["accounts"].items():
        read("ServiceAccount", core.read_namespaced_service_account, account,
             f"job {job}; k8s/base/serviceaccounts.yaml")
    for secret, ref in refs["secrets"].items():
        found = read("Secret", core.read_namespaced_secret, secret, f"job {ref['job']}; docs/kubernetes.md, Secrets")
        if found is not None:
            keys = set(found.get("data") or {}) | set(found.get("stringData") or {})
            wanted = {**ref["keys"], **{key: ref["job"] for key in (s3_keys or {}).get(secret, ())}}
            problems += [f"Secret {secret} has no key {key} (job {job} reads it)"
                         for key, job in sorted(wanted.items()) if key not in keys]
    for claim, job in refs["claims"].items():
        read("PersistentVolumeClaim", core.read_namespaced_persistent_volume_claim, claim, f"job {job} mounts it")
    custom = k.CustomObjectsApi(backend.api)
    for queue, job in refs["queues"].items():
        found = backend.get(f"read localqueue {queue}", custom.get_namespaced_custom_object, *KUEUE[:2], ns,
                            KUEUE[2], queue)
        if _missing(found) and f'"{queue}" not found' in _message(found):  # the object, not the kind
            problems.append(f"LocalQueue {queue} not found in {ns} (k8s.queue_name; job {job})")
        elif _missing(found):
            problems.append(f"Kueue is not installed (the API serves no localqueues.kueue.x-k8s.io) but job {job} "
                            f"names queue {queue} (k8s.queue_name)")
        elif _forbidden(found):
            notes.append(f"cannot check LocalQueue {queue}: forbidden")
    if refs["gpus"]:
        nodes = backend.get("list nodes", core.list_node)
        for resource, jobs_asking in refs["gpus"].items():
            if _forbidden(nodes):
                notes.append(f"cannot list nodes (forbidden): not checked that a node offers {resource}")
            elif not any(str((n.get("status") or {}).get("allocatable", {}).get(resource, "0")) not in ("0", "")
                         for n in nodes.get("items") or []):
                problems.append(f"no node offers {resource} (jobs {', '.join(jobs_asking)} request it); a node "
                                "pool that scales from zero: --set k8s.preflight=false")
    return problems, notes
