"""Reading Job and Pod state (plain camelCase dicts, as the API returns them) into verdicts.

A waiter needs explicit success and failure conditions (the lightkube/kr8s lesson): ``job_verdict`` says
whether a Job finished and how; ``pod_problem`` spots pods that will never get anywhere on their own
(image pull failures, missing Secrets); ``event_verdict`` reads the Events the cluster wrote about the Job,
its pods and its Kueue Workload to tell fatal (FailedCreate, FailedMount, Multi-Attach, NotTriggerScaleUp)
from pending (queued in Kueue, waiting for a node, a scale-up under way: ``waiting_notes``). Each failure
reads as one line that names the cause, the pod, and the kubectl command to look closer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

# Container waiting reasons that never resolve by waiting (after the grace period for pull errors).
_PULL = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")
_CONFIG = ("CreateContainerConfigError", "CreateContainerError")
# Event reasons that do not resolve by waiting (once older than k8s.pending_grace_s): the Job controller
# cannot create pods (quota, admission, Pod Security), a volume cannot be mounted or attached (Multi-Attach),
# or the cluster autoscaler says no node group could fit the pod.
# A FailedCreate for an exhausted ResourceQuota is waiting, not failing: the pods start once quota frees up.
FATAL_EVENTS = ("FailedCreate", "FailedMount", "FailedAttachVolume", "NotTriggerScaleUp")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # Complete | OOMKilled | ImagePullBackOff | Unschedulable | DeadlineExceeded | ...
    message: str = ""
    pod: str | None = None

    def line(self, stage: str, namespace: str, job: str) -> str:
        """``stage finetune failed: OOMKilled — ...; inspect: kubectl ...``"""
        if self.ok:
            return f"stage {stage} complete (job {job})"
        where = f" in pod {self.pod}" if self.pod else f" (job {job})"
        msg = f": {self.message}" if self.message else ""
        inspect = (f"kubectl -n {namespace} describe pod {self.pod}; kubectl -n {namespace} logs {self.pod}"
                   if self.pod else f"kubectl -n {namespace} describe job {job}")
        return f"stage {stage} failed: {self.reason}{where}{msg}; inspect: {inspect}"


def _conditions(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return (obj.get("status") or {}).get("conditions") or []


def _true(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in _conditions(obj) if c.get("type") == ctype and c.get("status") == "True"), None)


def _name(obj: dict[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("name", "?")


def _one_line(text: str | None, limit: int = 300) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    return last if len(last) <= limit else last[:limit - 1] + "…"


def _statuses(pod: dict[str, Any]) -> list[dict[str, Any]]:
    status = pod.get("status") or {}
    return (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])


def _memory_limit(pod: dict[str, Any], container: str) -> str | None:
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == container:
            return ((c.get("resources") or {}).get("limits") or {}).get("memory")
    return None


def pod_failure(pod: dict[str, Any]) -> Verdict | None:
    """Why a terminated pod failed: OOMKilled, or the exit code with the container's last log line."""
    for cs in _statuses(pod):
        term = ((cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated"))
        if not term or term.get("exitCode", 0) == 0:
            continue
        if term.get("reason") == "OOMKilled":
            limit = _memory_limit(pod, cs.get("name", ""))
            return Verdict(False, "OOMKilled", f"container {cs.get('name')} exceeded its memory limit"
                           + (f" ({limit}); raise k8s.resources.<stage>.memory" if limit else ""), _name(pod))
        detail = _one_line(term.get("message")) or term.get("reason") or ""
        return Verdict(False, f"exit code {term.get('exitCode')}", detail, _name(pod))
    status = pod.get("status") or {}
    if status.get("phase") == "Failed":
        return Verdict(False, status.get("reason") or "PodFailed", _one_line(status.get("message")), _name(pod))
    return None


def parse_time(timestamp: str | None) -> datetime:
    """An API timestamp (RFC 3339, also with fractions) as an aware datetime; the epoch when missing/bad."""
    if not timestamp:
        return _EPOCH
    try:
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return _EPOCH


def _age_s(timestamp: str | None, now: datetime) -> float:
    then = parse_time(timestamp)
    return float("inf") if then == _EPOCH else (now - then).total_seconds()


def event_time(event: dict[str, Any]) -> datetime:
    """When an Event last happened (core/v1 events carry lastTimestamp or, from newer reporters, eventTime)."""
    series = (event.get("series") or {}).get("lastObservedTime")
    return parse_time(event.get("lastTimestamp") or series or event.get("eventTime")
                      or event.get("firstTimestamp") or (event.get("metadata") or {}).get("creationTimestamp"))


def _first_time(event: dict[str, Any]) -> str | None:
    return event.get("firstTimestamp") or event.get("eventTime") or event.get("lastTimestamp")


def quota_wait(event: dict[str, Any]) -> bool:
    """A FailedCreate because a ResourceQuota is used up (``exceeded quota``): the Job controller retries."""
    return event.get("reason") == "FailedCreate" and "exceeded quota" in str(event.get("message") or "")


def _pending(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in (None, "Pending")


def event_verdict(events: list[dict[str, Any]], job: dict[str, Any], pods: list[dict[str, Any]], grace_s: float,
                  now: datetime | None = None) -> Verdict | None:
    """A fatal Event (``FATAL_EVENTS``) about the Job (while it has no running pod) or a still-pending pod,
    first seen at least ``grace_s`` ago: the newest such one, with the Event's message."""
    now = now or datetime.now(timezone.utc)
    pending = {_name(p) for p in pods if _pending(p)}
    running = bool((job.get("status") or {}).get("active")) and not pending
    for event in reversed(events):
        obj = event.get("involvedObject") or {}
        if event.get("reason") not in FATAL_EVENTS or quota_wait(event):
            continue
        if obj.get("kind") == "Pod" and obj.get("name") not in pending:
            continue
        if obj.get("kind") == "Job" and running:
            continue
        if _age_s(_first_time(event), now) >= grace_s:
            pod = obj.get("name") if obj.get("kind") == "Pod" else None
            return Verdict(False, event["reason"], _one_line(event.get("message")), pod)
    return None


def waiting_notes(events: list[dict[str, Any]], job: dict[str, Any], pods: list[dict[str, Any]]) -> list[str]:
    """Why the Job is not (all) running yet, or what it went through, one short line each: queued in Kueue
    (suspended Job), no pods for want of ResourceQuota, pods waiting for a node or a scale-up, pods evicted
    and replaced."""
    notes = []
    if (job.get("spec") or {}).get("suspend"):
        kueue = ([e for e in events if (e.get("involvedObject") or {}).get("kind") == "Workload"]
                 or [e for e in events if e.get("reason") in ("Suspended", "Pending")])  # the Workload says why
        why = _one_line(kueue[-1].get("message")) if kueue else "waiting for admission"
        notes.append(f"queued (Kueue: {why})")
    quota = [e for e in events if quota_wait(e)]
    if quota and not (job.get("status") or {}).get("active"):
        notes.append(f"waiting: quota ({_one_line(quota[-1].get('message'))})")
    for pod in pods:
        name = _name(pod)
        status = pod.get("status") or {}
        if status.get("phase") == "Failed" and status.get("reason") == "Evicted":
            notes.append(f"pod {name} evicted ({_one_line(status.get('message'))}); the Job replaces it")
            continue
        sched = next((c for c in _conditions(pod) if c.get("type") == "PodScheduled"), None)
        if not _pending(pod) or not sched or sched.get("status") != "False":
            continue
        scale_up = [e for e in events if e.get("reason") == "TriggeredScaleUp"
                    and (e.get("involvedObject") or {}).get("name") == name]
        if scale_up:
            notes.append(f"pending: pod {name} waits for a new node ({_one_line(scale_up[-1].get('message'))})")
        else:
            notes.append(f"pending: pod {name} {sched.get('reason') or 'unscheduled'}: "
                         f"{_one_line(sched.get('message'))}")
    return notes


def pod_problem(pod: dict[str, Any], grace_s: float, now: datetime | None = None) -> Verdict | None:
    """A pending pod that will not start by itself: bad image, missing Secret/ConfigMap."""
    now = now or datetime.now(timezone.utc)
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Pending"):
        return None
    for cs in _statuses(pod):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in _CONFIG:
            return Verdict(False, reason, _one_line(waiting.get("message")), _name(pod))
        if reason in _PULL:
            created = (pod.get("metadata") or {}).get("creationTimestamp")
            if _age_s(created, now) >= grace_s:
                image = cs.get("image") or ""
                return Verdict(False, reason, f"cannot pull image {image}: {_one_line(waiting.get('message'))}"
                               .rstrip(": "), _name(pod))
    return None  # Unschedulable is queueing (waiting_notes) unless an Event says otherwise (event_verdict)


def job_verdict(job: dict[str, Any], pods: list[dict[str, Any]] = ()) -> Verdict | None:
    """Complete, Failed (with the root cause from its pods where one is known), or None while running."""
    if _true(job, "Complete") or _true(job, "SuccessCriteriaMet"):
        return Verdict(True, "Complete")
    failed = _true(job, "Failed") or _true(job, "FailureTarget")
    if not failed:
        return None
    reason = failed.get("reason") or "Failed"
    message = _one_line(failed.get("message"))
    if reason != "DeadlineExceeded":  # a deadline is the root cause whatever the pods were doing
        causes = [v for v in (pod_failure(p) for p in _newest_first(pods)) if v]
        if causes:
            cause = causes[0]
            return Verdict(False, cause.reason, f"{cause.message} ({reason})".lstrip(" "), cause.pod)
    return Verdict(False, reason, message)


def _newest_first(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "", reverse=True)
