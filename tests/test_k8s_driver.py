"""The Kubernetes driver against kmock's API emulator, through the real ``kubernetes`` client.

kmock has no controllers, so a small fake "job controller + kubelet" thread plays the cluster: it sees
each new Job, creates its pods, Events and Pod and Job status for the scenario under test (success writes the
stage's ``_SUCCESS`` into the store, as the real Job would): Kueue-suspended Jobs, Jobs without pods
(FailedCreate), FailedMount, Multi-Attach, scale-ups, evicted pods, a dropped log stream. The emulator honours
``dryRun`` (it answers with the object and stores nothing) and serves timestamped logs, as a kubelet does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import kmock
import pytest
import yaml
from click.testing import CliRunner
from kubernetes import client as k

from pipeline import __version__
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.context import StageContext, store_for
from pipeline.errors import PipelineError
from pipeline.executors.k8s import KubeBackend, load_api_client, run_pipeline
from pipeline.k8s.objects import job_name

NS = "ielts-test"
pytestmark = pytest.mark.timeout(60)


class DryRunEmulator(kmock.KubernetesEmulator):
    """kmock's emulator stores every create; a real API server stores nothing for ``?dryRun=All``."""

    async def _handle(self, request):
        if request.action == kmock.action.CREATE and "dryRun" in (request.params or {}):
            return await super(kmock.KubernetesEmulator, self)._handle(request)  # reactions only, no storage
        return await super()._handle(request)


class Emulator:
    """kmock's KubernetesEmulator on a loopback port, in its own event-loop thread."""

    def __init__(self) -> None:
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
        self._ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.logs: dict[str, str | list[str]] = {}
        self.log_requests: dict[str, int] = {}
        self.refuse: dict[str, str] = {}  # Job name -> admission message for its dry run
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(20), "kmock did not start"

    async def _main(self) -> None:
        async with DryRunEmulator() as emu, kmock.Server(emu) as server:
            emu.resources.load_bundled()
            emu[kmock.subresource("log")] << self._log
            emu["create", kmock.params(dryRun="All")] << self._dry_run  # admitted (or refused), not stored
            self.emu, self.url = emu, str(server.url).rstrip("/")
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def _dry_run(self, req):
        name = (req.data.get("metadata") or {}).get("name")
        if name in self.refuse:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=self.refuse[name])
        return req.data

    def _log(self, req) -> bytes:
        """The pod's log lines so far, each ``<RFC3339> <text>`` (timestamps=true). A list of strings in
        ``logs`` is served one growing prefix per request, the stream closing after each: a dropped stream."""
        value = self.logs.get(req.name, "")
        if isinstance(value, list):
            self.log_requests[req.name] = served = self.log_requests.get(req.name, 0) + 1
            value = "".join(value[:served])
        return "".join(f"2026-01-01T00:00:{i:02d}.000000000Z {line}\n"
                       for i, line in enumerate(value.splitlines())).encode()

    def expire_next_job_watch(self) -> None:
        gone = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                            "code": 410, "reason": "Expired", "message": "too old resource version"}}
        self.loop.call_soon_threadsafe(
            lambda: self.emu["watch", kmock.resource("batch/v1/jobs")][:1] << (json.dumps(gone) + "\n").encode())

    def requests(self, action: str) -> int:
        return len([r for r in self.emu[action, kmock.resource("batch/v1/jobs")] if "dryRun" not in (r.params or {})])

    def driver_job_calls(self) -> list[str]:
        """list/watch calls on Jobs by name (the driver's; the fake cluster lists them all)."""
        return [str(r.action.value).lower() for r in list(self.emu[kmock.resource("batch/v1/jobs")])
                if "fieldSelector" in (r.params or {})]

    def api(self) -> k.ApiClient:
        cfg = k.Configuration()
        cfg.host = self.url
        return k.ApiClient(cfg)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def _ts(seconds_ago: float = 0) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _waiting(reason: str, message: str) -> dict:
    return {"phase": "Pending", "containerStatuses": [
        {"name": "c", "image": "ghcr.io/x/finetune:1.2.3", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"waiting": {"reason": reason, "message": message}}}]}


def _terminated(stage: str, code: int, reason: str, message: str = "") -> dict:
    return {"phase": "Failed" if code else "Succeeded", "containerStatuses": [
        {"name": stage, "image": "img", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"terminated": {"exitCode": code, "reason": reason, "message": message}}}]}


class FakeCluster(threading.Thread):
    """Plays the Job controller and kubelet. ``scenarios[stage]`` picks what happens to that stage's Job."""

    def __init__(self, emulator: Emulator, config, scenarios: dict[str, str]):
        super().__init__(daemon=True)
        self.emulator, self.config, self.scenarios = emulator, config, scenarios
        self.batch, self.core = k.BatchV1Api(emulator.api()), k.CoreV1Api(emulator.api())
        self.seen: list[str] = []
        self.events = 0
        self.done = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while not self.done.is_set():
                jobs = json.loads(self.batch.list_namespaced_job(NS, _preload_content=False).data)["items"]
                for job in jobs:
                    if job["metadata"]["name"] not in self.seen:
                        self.seen.append(job["metadata"]["name"])
                        self.play(job["metadata"]["labels"]["ielts-distill/stage"], job)
                time.sleep(0.05)
        except Exception as exc:  # surfaced by _drive: a broken fake must fail the test, not hang it
            self.error = exc
            raise

    def pod(self, job, stage: str, index: int, status: dict) -> str:
        name = f"{job['metadata']['name']}-{index}-x{len(self.seen)}"
        while name in self.emulator.logs:  # a replacement pod of the same index
            name += "r"
        self.emulator.logs[name] = f"{stage} shard {index} working\nielts-distill job: stage {stage} finished OK\n"
        labels = {"job-name": job["metadata"]["name"], "batch.kubernetes.io/job-completion-index": str(index)}
        self.core.create_namespaced_pod(NS, {"metadata": {"name": name, "namespace": NS, "labels": labels,
                                                          "creationTimestamp": _ts(5)},
                                             "spec": job["spec"]["template"]["spec"], "status": status},
                                     _preload_content=False)
        return name

    def event(self, kind: str, name: str, reason: str, message: str, seconds_ago: float = 5) -> None:
        self.events += 1
        self.core.create_namespaced_event(NS, {
            "metadata": {"name": f"{name}.{self.events}", "namespace": NS},
            "involvedObject": {"kind": kind, "name": name, "namespace": NS}, "reason": reason, "message": message,
            "type": "Normal" if reason in ("TriggeredScaleUp", "Pending") else "Warning",
            "firstTimestamp": _ts(seconds_ago), "lastTimestamp": _ts(1)}, _preload_content=False)

    def succeed(self, job, stage: str, pods: list[str], shards: int = 1) -> None:
        StageContext(config=self.config, store=store_for(self.config), stage=stage).complete({"items": shards})
        for name in pods:
            self.core.patch_namespaced_pod_status(name, NS, {"status": _terminated(stage, 0, "Completed")},
                                                  _preload_content=False)
        self.job_status(job, {"succeeded": shards, "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]})

    def job_status(self, job, status: dict) -> None:
        self.batch.patch_namespaced_job_status(job["metadata"]["name"], NS, {"status": status}, _preload_content=False)

    def play(self, stage: str, job) -> None:
        scenario = self.scenarios.get(stage, "success")
        shards = job["spec"].get("completions") or 1
        name = job["metadata"]["name"]
        if scenario == "success":
            pods = [self.pod(job, stage, i, {"phase": "Running"}) for i in range(shards)]
            time.sleep(0.3)  # the driver is watching by now
            self.succeed(job, stage, pods, shards)
        elif scenario == "queued":  # Kueue's webhook suspends the Job until its Workload is admitted
            self.batch.patch_namespaced_job(name, NS, {"spec": {"suspend": True}}, _preload_content=False)
            self.event("Workload", f"job-{name}-8f2c1", "Pending", "couldn't assign flavors to pod set main: "
                       "insufficient unused quota for nvidia.com/gpu in flavor h100, 1 more needed")
            self.event("Job", name, "Suspended", "Job suspended", seconds_ago=1)  # newer, but says less
            time.sleep(1.0)
            self.batch.patch_namespaced_job(name, NS, {"spec": {"suspend": False}}, _preload_content=False)
            self.succeed(job, stage, [self.pod(job, stage, 0, {"phase": "Running"})])
        elif scenario in ("waiting", "scaleup"):  # an unschedulable pod that gets a node after a while
            pod = self.pod(job, stage, 0, {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": _ts(60),
                 "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]})
            if scenario == "scaleup":
                self.event("Pod", pod, "TriggeredScaleUp", "pod triggered scale-up: [{h100-pool 0->1 (max: 4)}]")
            time.sleep(1.0)
            self.core.patch_namespaced_pod_status(pod, NS, {"status": {"phase": "Running", "conditions": [
                {"type": "PodScheduled", "status": "True"}]}}, _preload_content=False)
            self.succeed(job, stage, [pod])
        elif scenario == "noscaleup":
            pod = self.pod(job, stage, 0, {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": _ts(60),
                 "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]})
            self.event("Pod", pod, "NotTriggerScaleUp", "pod didn't trigger scale-up: 2 node(s) didn't match "
                       "Pod's node affinity/selector, 1 max node group size reached")
        elif scenario == "quota":  # the Job controller cannot create any pod
            self.event("Job", name, "FailedCreate", f'Error creating: pods "{name}-0-x" is forbidden: exceeded '
                       "quota: ielts-distill-gpus, requested: requests.nvidia.com/gpu=1, used: "
                       "requests.nvidia.com/gpu=4, limited: requests.nvidia.com/gpu=4")
        elif scenario == "mount":
            pod = self.pod(job, stage, 0, {"phase": "Pending"})
            self.event("Pod", pod, "FailedMount", 'MountVolume.SetUp failed for volume "data" : '
                       'persistentvolumeclaim "chart2text-data" not found')
        elif scenario == "multiattach":
            pod = self.pod(job, stage, 0, {"phase": "Pending"})
            self.event("Pod", pod, "FailedAttachVolume", 'Multi-Attach error for volume "pvc-7c1" Volume is '
                       "already used by pod(s) ielts-t1-finetune-0-abc")
        elif scenario == "evicted":  # the Job replaces an evicted pod (podFailurePolicy: Ignore)
            self.pod(job, stage, 0, {"phase": "Failed", "reason": "Evicted",
                                     "message": "The node was low on resource: memory."})
            time.sleep(0.5)
            self.succeed(job, stage, [self.pod(job, stage, 0, {"phase": "Running"})])
        elif scenario == "droplog":  # the log stream drops twice while the pod runs
            pod = self.pod(job, stage, 0, {"phase": "Running"})
            self.emulator.logs[pod] = ["loading\n", "step 1\n", "step 2\nielts-distill job: done\n"]
            time.sleep(2.0)
            self.succeed(job, stage, [pod])
        elif scenario == "oom":
            self.pod(job, stage, 0, _terminated(stage, 137, "OOMKilled"))
            self.job_status(job, {"failed": 1, "conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit"}]})
        elif scenario == "crash":
            self.pod(job, stage, 0, _terminated(stage, 1, "Error", "Traceback...\nerror: stage 'dataset' needs "
                                                                   "stage 'teacher' to have completed"))
            self.job_status(job, {"failed": 3, "conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit"}]})
        elif scenario == "deadline":
            self.pod(job, stage, 0, {"phase": "Running"})
            self.job_status(job, {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                                                  "message": "Job was active longer than specified deadline"}]})
        elif scenario == "imagepull":
            self.pod(job, stage, 0, _waiting("ImagePullBackOff", 'Back-off pulling image "ghcr.io/x/finetune:1.2.3"'))
        elif scenario == "secret":
            self.pod(job, stage, 0, _waiting("CreateContainerConfigError", 'secret "ielts-distill-llm" not found'))
        elif scenario == "unschedulable":
            self.pod(job, stage, 0, {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": _ts(60),
                 "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]})
        elif scenario == "hang":
            self.pod(job, stage, 0, {"phase": "Running"})


@pytest.fixture
def emulator():
    emu = Emulator()
    yield emu
    emu.close()


def _config(tmp_path, *extra: str):
    return load_config(None, ["run.id=t1", f"store.uri={tmp_path / 'store'}", "k8s.store_claim=ielts-store",
                              f"k8s.namespace={NS}", "k8s.poll_s=0.2", "k8s.pending_grace_s=0", "k8s.wait_timeout_s=20",
                              "teacher.parallelism=2", "k8s.profile=cloud", *extra])


def _drive(emulator, config, scenarios=None, stages=("ingest", "teacher", "dataset"), backend=None, **kwargs):
    lines: list[str] = []
    cluster = FakeCluster(emulator, config, scenarios or {})
    cluster.start()
    try:
        run_pipeline(config, list(stages), backend=backend or KubeBackend(NS, emulator.api()), echo=lines.append,
                     **kwargs)
        return lines, cluster, None
    except PipelineError as exc:  # a stage failed (StageError), or the run could not start
        return lines, cluster, str(exc)
    finally:
        cluster.done.set()
        cluster.join(5)
        assert cluster.error is None, cluster.error


def test_success_runs_stages_in_order_streams_logs_and_status_reads_the_store(emulator, tmp_path):
    config = _config(tmp_path)
    lines, cluster, error = _drive(emulator, config)
    assert error is None
    assert cluster.seen == [job_name(config, s) for s in ("ingest", "teacher", "dataset")]
    assert "[teacher/1] ielts-distill job: stage teacher finished OK" in lines
    assert "[dataset] complete" in lines or "[dataset/0] dataset shard 0 working" in lines
    # the Indexed teacher Job as submitted: two completions, JOB_COMPLETION_COUNT set
    job = k.BatchV1Api(emulator.api()).read_namespaced_job(job_name(config, "teacher"), NS)
    assert (job.spec.completion_mode, job.spec.completions) == ("Indexed", 2)
    assert {"name": "JOB_COMPLETION_COUNT", "value": "2"} in [
        {"name": e.name, "value": e.value} for e in job.spec.template.spec.containers[0].env]
    # the run's config reached the cluster as a ConfigMap
    cm = k.CoreV1Api(emulator.api()).read_namespaced_config_map("ielts-t1-config", NS)
    assert yaml.safe_load(cm.data["config.yaml"])["run"]["id"] == "t1"
    result = CliRunner().invoke(main, ["status", "--json", "--set", f"store.uri={tmp_path / 'store'}",
                                       "--set", "run.id=t1"])
    states = {row["stage"]: row["state"] for row in json.loads(result.output)}
    assert states["ingest"] == states["teacher"] == states["dataset"] == "done"
    assert states["finetune"] == "not started"


def test_stages_complete_in_the_store_are_skipped(emulator, tmp_path):
    config = _config(tmp_path)
    store = store_for(config)
    for stage in ("ingest", "teacher"):
        StageContext(config=config, store=store, stage=stage).complete({})
    lines, cluster, error = _drive(emulator, config)
    assert error is None
    assert cluster.seen == [job_name(config, "dataset")]
    assert any(line.startswith("[ingest] already complete") for line in lines)


@pytest.mark.parametrize("scenario, stage, expected", [
    ("oom", "dataset", ["OOMKilled", "memory limit (8Gi)", "BackoffLimitExceeded"]),
    ("crash", "dataset", ["exit code 1", "needs stage 'teacher'", "BackoffLimitExceeded"]),
    ("deadline", "dataset", ["DeadlineExceeded", "active longer than specified deadline",
                             f"kubectl -n {NS} describe job ielts-t1-dataset"]),
    ("imagepull", "dataset", ["ImagePullBackOff", "cannot pull image"]),
    ("secret", "teacher", ["CreateContainerConfigError", 'secret "ielts-distill-llm" not found']),
    ("noscaleup", "dataset", ["NotTriggerScaleUp", "max node group size reached"]),
    ("mount", "dataset", ["FailedMount", 'persistentvolumeclaim "chart2text-data" not found']),
    ("multiattach", "dataset", ["FailedAttachVolume", "Multi-Attach error"]),
])
def test_each_failure_class_is_one_line_with_pod_and_command(emulator, tmp_path, scenario, stage, expected):
    config = _config(tmp_path)
    lines, cluster, error = _drive(emulator, config, {stage: scenario})
    assert error is not None and "\n" not in error
    assert error.startswith(f"stage {stage} failed: ")
    for text in expected:
        assert text in error, (text, error)
    if scenario != "deadline":
        assert f"in pod ielts-t1-{stage}-0-" in error and f"kubectl -n {NS} describe pod ielts-t1-{stage}-0-" in error
    assert cluster.seen[-1] == job_name(config, stage)  # nothing submitted after the failing stage


def test_watch_relists_after_410_gone(emulator, tmp_path):
    config = _config(tmp_path)
    emulator.expire_next_job_watch()
    lines, cluster, error = _drive(emulator, config, stages=("ingest",))
    assert error is None and "[ingest] complete" in lines
    calls = emulator.driver_job_calls()  # the first watch gets 410 Gone: list again before watching again
    assert calls[calls.index("watch"):][:3] == ["watch", "list", "watch"], calls


def test_timeout_leaves_the_job_running(emulator, tmp_path):
    config = _config(tmp_path, "k8s.wait_timeout_s=1")
    lines, cluster, error = _drive(emulator, config, {"ingest": "hang"}, stages=("ingest",))
    assert error.startswith("stage ingest failed: Timeout") and "k8s.wait_timeout_s" in error


@pytest.mark.parametrize("cleanup", [False, True])
def test_ctrl_c_reports_or_deletes_running_jobs(emulator, tmp_path, cleanup):
    config = _config(tmp_path)
    batch = k.BatchV1Api(emulator.api())

    class CtrlC(KubeBackend):  # Ctrl-C while the driver watches the running Job
        def watch_job(self, *args, **kwargs):
            raise KeyboardInterrupt
            yield

    with pytest.raises(KeyboardInterrupt):
        _drive(emulator, config, {"ingest": "hang"}, stages=("ingest",), cleanup=cleanup,
               backend=CtrlC(NS, emulator.api()))
    names = [j.metadata.name for j in batch.list_namespaced_job(NS).items]
    if cleanup:
        assert names == []
    else:
        assert names == ["ielts-t1-ingest"]


def test_running_job_is_reattached_not_resubmitted(emulator, tmp_path):
    config = _config(tmp_path)
    from pipeline.k8s.objects import build_job

    KubeBackend(NS, emulator.api()).create_job(build_job(config, "ingest"))
    lines, cluster, error = _drive(emulator, config, stages=("ingest",))
    assert error is None
    assert any("already running: attaching" in line for line in lines)
    assert emulator.requests("create") == 1


def _kubeconfig(tmp_path, current: str = "kmock", **servers: str):
    """A kube config file with one context per server (name -> URL), ``current`` selected."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": current,
        "clusters": [{"name": n, "cluster": {"server": url}} for n, url in servers.items()],
        "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": n, "context": {"cluster": n, "user": "u"}} for n in servers]}))
    return path


def test_cli_run_executor_k8s_uses_kubeconfig(emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path, kmock=emulator.url)))
    config = _config(tmp_path)
    cluster = FakeCluster(emulator, config, {})
    cluster.start()
    try:
        args = ["run", "--executor", "k8s", "--only", "ingest"]
        for item in ("run.id=t1", f"store.uri={tmp_path / 'store'}", "k8s.store_claim=ielts-store",
                     f"k8s.namespace={NS}", "k8s.poll_s=0.2"):
            args += ["--set", item]
        result = CliRunner().invoke(main, args)
    finally:
        cluster.done.set()
        cluster.join(5)
    assert result.exit_code == 0, result.output
    assert "[ingest] complete" in result.output


def test_pending_pods_get_a_grace_period_and_deadline_wins():
    from pipeline.k8s.diagnose import job_verdict, pod_problem

    pulling = {"metadata": {"name": "p", "creationTimestamp": _ts(30)},
               "status": _waiting("ErrImagePull", "registry timeout")}
    assert pod_problem(pulling, grace_s=300) is None  # a registry hiccup may resolve itself
    assert pod_problem(pulling, grace_s=10).reason == "ErrImagePull"
    stale = {"metadata": {"name": "old", "labels": {"batch.kubernetes.io/controller-uid": "u1"}},
             "status": _terminated("x", 137, "OOMKilled")}
    failed = {"metadata": {"uid": "u2"}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "too long"}]}}
    assert job_verdict(failed, [stale]).reason == "DeadlineExceeded"
    from pipeline.executors.k8s import _owned_by

    assert not _owned_by(stale, failed) and _owned_by(stale, {"metadata": {"uid": "u1"}})


# --------------------------------------------------------------------------- issue 15: what the cluster says


def test_a_job_without_pods_fails_with_the_failedcreate_message(emulator, tmp_path):
    config = _config(tmp_path)
    lines, cluster, error = _drive(emulator, config, {"dataset": "quota"})
    assert error.startswith("stage dataset failed: FailedCreate (job ielts-t1-dataset): Error creating:")
    assert "exceeded quota: ielts-distill-gpus" in error and "\n" not in error
    assert f"kubectl -n {NS} describe job ielts-t1-dataset" in error


@pytest.mark.parametrize("scenario, note", [
    ("queued", "[dataset] queued (Kueue: couldn't assign flavors to pod set main: insufficient unused quota for "
               "nvidia.com/gpu in flavor h100, 1 more needed)"),
    ("waiting", "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
    ("scaleup", "waits for a new node (pod triggered scale-up: [{h100-pool 0->1 (max: 4)}])"),
    ("evicted", "evicted (The node was low on resource: memory.); the Job replaces it"),
])
def test_queueing_scale_up_and_eviction_are_reported_not_failed(emulator, tmp_path, scenario, note):
    config = _config(tmp_path)  # k8s.pending_grace_s=0: before, an unschedulable pod failed the run at once
    lines, cluster, error = _drive(emulator, config, {"dataset": scenario})
    assert error is None, error
    assert "[dataset] complete" in lines
    matching = [line for line in lines if note in line]
    assert len(matching) == 1, lines  # said once, not every poll


def test_a_dropped_log_stream_is_resumed_without_repeating_lines(emulator, tmp_path):
    config = _config(tmp_path)
    lines, cluster, error = _drive(emulator, config, {"ingest": "droplog"}, stages=("ingest",))
    assert error is None, error
    logged = [line for line in lines if line.startswith("[ingest/0] ")]
    assert logged == ["[ingest/0] loading", "[ingest/0] step 1", "[ingest/0] step 2",
                      "[ingest/0] ielts-distill job: done"], lines
    assert max(emulator.log_requests.values()) >= 3  # the stream was opened again after each drop


def test_dry_run_of_every_job_before_the_first_stage(emulator, tmp_path):
    config = _config(tmp_path)
    emulator.refuse["ielts-t1-dataset"] = ('admission webhook "vjob.kb.io" denied the request: '
                                           "spec.template.spec.containers[0].resources: GPU requests need a queue")
    lines, cluster, error = _drive(emulator, config)
    assert error is not None and error.startswith("create job ielts-t1-dataset (dry run): Kubernetes API 422")
    assert "denied the request" in error
    assert cluster.seen == [] and emulator.requests("create") == 0  # nothing started, not even ingest


def test_reattaching_keeps_a_running_jobs_configmap(emulator, tmp_path):
    from pipeline.k8s.objects import build_configmap, build_job

    backend = KubeBackend(NS, emulator.api())
    running = _config(tmp_path)
    backend.apply_configmap(build_configmap(running))
    backend.create_job(build_job(running, "ingest"))  # running: no status yet
    changed = _config(tmp_path, "data.limit=3")
    with pytest.raises(PipelineError, match="job ielts-t1-ingest of run t1 is running with another config"):
        run_pipeline(changed, ["ingest"], backend=backend, echo=lambda line: None)
    cm = k.CoreV1Api(emulator.api()).read_namespaced_config_map("ielts-t1-config", NS)
    assert yaml.safe_load(cm.data["config.yaml"])["data"]["limit"] is None  # the running Job's config stays
    lines, cluster, error = _drive(emulator, running, stages=("ingest",))  # same config: re-attach
    assert error is None and any("already running: attaching" in line for line in lines)


def test_dead_and_silent_api_servers_fail_in_one_line(tmp_path):
    import socket

    config = _config(tmp_path, "k8s.request_timeout_s=0.5")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        for url, expected in ((f"http://127.0.0.1:{port}", "cannot reach the Kubernetes API at"),
                              (f"http://127.0.0.1:{silent.getsockname()[1]}", "did not answer within 0.5s")):
            kubeconfig = _kubeconfig(tmp_path, "c", c=url)
            started = time.monotonic()  # the client as the CLI builds it (its retry settings included)
            with pytest.raises(PipelineError) as info:
                run_pipeline(config, ["ingest"], backend=KubeBackend(NS, load_api_client(str(kubeconfig)), 0.5),
                             echo=lambda line: None)
            assert time.monotonic() - started < 10
            message = str(info.value)
            assert expected in message and url in message and "\n" not in message, message
            assert "Traceback" not in message and "urllib3" not in message
    finally:
        silent.close()


def test_cli_context_and_kubeconfig_options(emulator, tmp_path, monkeypatch):
    kubeconfig = _kubeconfig(tmp_path, "elsewhere", kmock=emulator.url, elsewhere="http://127.0.0.1:9")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    config = _config(tmp_path)
    cluster = FakeCluster(emulator, config, {})
    cluster.start()
    try:
        args = ["run", "--executor", "k8s", "--only", "ingest", "--kubeconfig", str(kubeconfig)]
        for item in ("run.id=t1", f"store.uri={tmp_path / 'store'}", "k8s.store_claim=ielts-store",
                     f"k8s.namespace={NS}", "k8s.poll_s=0.2"):
            args += ["--set", item]
        result = CliRunner().invoke(main, [*args, "--context", "kmock"])
        missing = CliRunner().invoke(main, [*args, "--context", "nope"])
    finally:
        cluster.done.set()
        cluster.join(5)
    assert result.exit_code == 0, result.output
    assert "[ingest] complete" in result.output
    assert missing.exit_code == 1 and "context nope" in missing.output


def test_submit_creates_the_driver_job_and_says_how_to_follow_it(emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path, kmock=emulator.url)))
    args = ["submit", "--from", "teacher", "--set", "run.id=t1", "--set", "store.uri=s3://bucket/runs",
            "--set", f"k8s.namespace={NS}", "--set", "k8s.s3_endpoint=http://seaweedfs:8333"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"kubectl -n {NS} logs -f job/ielts-t1-driver" in result.output
    job = json.loads(k.BatchV1Api(emulator.api()).read_namespaced_job("ielts-t1-driver", NS,
                                                                       _preload_content=False).data)
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ielts-distill-driver" and pod["automountServiceAccountToken"] is True
    (container,) = pod["containers"]
    assert container["command"] == ["ielts-distill", "run", "--executor", "k8s", "--config",
                                    "/etc/ielts-distill/config.yaml", "--from", "teacher"]
    assert container["image"] == f"ghcr.io/ielts-distill/base:{__version__}"
    assert {"secretRef": {"name": "ielts-distill-s3"}} in container["envFrom"]
    cm = k.CoreV1Api(emulator.api()).read_namespaced_config_map("ielts-t1-config", NS)
    assert yaml.safe_load(cm.data["config.yaml"])["run"]["id"] == "t1"
    again = CliRunner().invoke(main, args)  # the driver Job still runs: follow it, do not start a second
    assert again.exit_code == 1 and "driver job ielts-t1-driver is already running" in again.output
    assert emulator.requests("create") == 1


def test_executor_status_logs_and_cancel(emulator, tmp_path):
    from pipeline.executors.k8s import KubeExecutor
    from pipeline.k8s.objects import build_job
    from pipeline.stages import spec

    config = _config(tmp_path)
    executor = KubeExecutor(config, backend=KubeBackend(NS, emulator.api()), echo=lambda line: None)
    ctx = StageContext(config=config, store=executor.store, stage="ingest")
    assert executor.status(spec("ingest"), ctx) == "no job ielts-t1-ingest"
    assert executor.cancel(spec("ingest"), ctx) is False
    cluster = FakeCluster(emulator, config, {"ingest": "hang"})
    cluster.start()
    try:
        executor.backend.create_job(build_job(config, "ingest"))
        deadline = time.monotonic() + 10
        while not executor.backend.list_pods("ielts-t1-ingest") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert executor.status(spec("ingest"), ctx).startswith("job ielts-t1-ingest: running")
        shown = CliRunner().invoke(main, ["status", "--executor", "k8s", "--kubeconfig",
                                          str(_kubeconfig(tmp_path, kmock=emulator.url)), "--set", "run.id=t1",
                                          "--set", f"store.uri={tmp_path / 'store'}", "--set", f"k8s.namespace={NS}",
                                          "--set", "k8s.store_claim=ielts-store"])
        assert shown.exit_code == 0, shown.output
        assert "[job ielts-t1-ingest: running (active 0, succeeded 0, failed 0)]" in shown.output
        assert list(executor.logs(spec("ingest"), ctx))[-1].endswith("stage ingest finished OK")
        assert executor.cancel(spec("ingest"), ctx) is True
        assert executor.backend.read_job("ielts-t1-ingest")[0] is None
    finally:
        cluster.done.set()
        cluster.join(5)
