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
from pipeline.executors.k8s import run_pipeline
from pipeline.k8s.client import KubeBackend, load_api_client
from pipeline.k8s.objects import job_name

NS = "ielts-test"
pytestmark = pytest.mark.timeout(60)


class DryRunEmulator(kmock.KubernetesEmulator):
    """kmock's emulator stores every create; a real API server stores nothing for ``?dryRun=All`` nor for an
    access review (answered by a reaction)."""

    async def _handle(self, request):
        if request.action == kmock.action.CREATE and ("dryRun" in (request.params or {})
                                                      or str(request.url.path).endswith("accessreviews")):
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
        self.denied: set[tuple[str, str]] = set()  # (verb, resource) SelfSubjectAccessReviews answer "no" to
        self.queues: set[str] | None = set()  # Kueue LocalQueues in NS; None: Kueue is not installed
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(20), "kmock did not start"

    async def _main(self) -> None:
        async with DryRunEmulator() as emu, kmock.Server(emu) as server:
            emu.resources.load_bundled()
            emu[kmock.subresource("log")] << self._log
            emu["create", kmock.params(dryRun="All")] << self._dry_run  # admitted (or refused), not stored
            emu["create", kmock.resource("authorization.k8s.io/v1/selfsubjectaccessreviews")] << self._review
            emu["get", kmock.resource("kueue.x-k8s.io/v1beta1/localqueues")] << self._queue
            self.emu, self.url = emu, str(server.url).rstrip("/")
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def _dry_run(self, req):
        name = (req.data.get("metadata") or {}).get("name")
        if name in self.refuse:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=self.refuse[name])
        return req.data

    def _review(self, req) -> dict:
        attrs = req.data["spec"]["resourceAttributes"]
        return {**req.data, "status": {"allowed": (attrs["verb"], attrs["resource"]) not in self.denied}}

    def _queue(self, req) -> dict:
        """What a real API server answers: the LocalQueue, a NotFound naming it, or (no Kueue CRDs) a bare 404."""
        if self.queues is None:
            raise kmock.KubernetesError(status=404, reason="NotFound", message="the server could not find the "
                                                                             "requested resource")
        if req.name not in self.queues:
            raise kmock.KubernetesError(status=404, reason="NotFound",
                                        message=f'localqueues.kueue.x-k8s.io "{req.name}" not found')
        return {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue",
                "metadata": {"name": req.name, "namespace": NS}, "spec": {"clusterQueue": "gpus"}}

    def seed(self) -> None:
        """What the driver's preflight looks for in a namespace set up as docs/kubernetes.md says: the namespace
        (its root CA ConfigMap, which every namespace has), the store PVC, the LLM Secret, a GPU node."""
        core = k.CoreV1Api(self.api())
        core.create_namespaced_config_map(NS, {"metadata": {"name": "kube-root-ca.crt"}, "data": {"ca.crt": "-"}})
        core.create_namespaced_persistent_volume_claim(NS, {"metadata": {"name": "ielts-store", "namespace": NS}})
        core.create_namespaced_secret(NS, {"metadata": {"name": "ielts-distill-llm"},
                                           "data": {"MINIMAX_API_KEY": "bm90LWEta2V5"}})
        self.emu.objects["v1/nodes", None, "gpu-1"] = {"metadata": {"name": "gpu-1"},
                                                       "status": {"allocatable": {"nvidia.com/gpu": "8"}}}

    def seed_driver(self) -> None:
        """k8s/base's driver ServiceAccount and the S3 Secret (ielts-distill submit with an S3 store)."""
        core = k.CoreV1Api(self.api())
        core.create_namespaced_service_account(NS, {"metadata": {"name": "ielts-distill-driver"}})
        core.create_namespaced_secret(NS, {"metadata": {"name": "ielts-distill-s3"}, "data": {
            "AWS_ACCESS_KEY_ID": "eA==", "AWS_SECRET_ACCESS_KEY": "eA=="}})

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
        self.proxy, self.outage_s, self.suspended_at_creation = None, 2.0, None
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
        if scenario in ("success", "slow"):
            pods = [self.pod(job, stage, i, {"phase": "Running"}) for i in range(shards)]
            time.sleep(0.3 if scenario == "success" else 3.0)  # the driver is watching by now
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
        elif scenario == "outage":  # the driver's line to the API is cut while it watches the running Job
            pod = self.pod(job, stage, 0, {"phase": "Running"})
            time.sleep(0.5)
            self.proxy.down()
            time.sleep(self.outage_s)
            self.proxy.up()
            self.succeed(job, stage, [pod])
        elif scenario == "cut":  # the line to the API is cut for good while the driver watches
            self.pod(job, stage, 0, {"phase": "Running"})
            time.sleep(0.5)
            self.proxy.down()
        elif scenario == "admitted":  # created suspended (k8s.queue_name); Kueue admits it after a while
            self.suspended_at_creation = job["spec"].get("suspend")
            self.event("Workload", f"job-{name}-5d1e0", "Pending", "couldn't assign flavors to pod set main: "
                       "insufficient unused quota for cpu in flavor default, 1 more needed")
            time.sleep(1.0)
            self.batch.patch_namespaced_job(name, NS, {"spec": {"suspend": False}}, _preload_content=False)
            self.succeed(job, stage, [self.pod(job, stage, 0, {"phase": "Running"})])
        elif scenario == "quota-then-room":
            self.event("Job", name, "FailedCreate", f'Error creating: pods "{name}-0-x" is forbidden: exceeded quota: q')
            time.sleep(1.0)
            self.succeed(job, stage, [self.pod(job, stage, 0, {"phase": "Running"})])
        elif scenario == "podsecurity":
            self.event("Job", name, "FailedCreate", f'Error creating: pods "{name}-0-x" is forbidden: violates '
                       'PodSecurity "restricted:latest": allowPrivilegeEscalation != false')
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
    emu.seed()
    yield emu
    emu.close()


def _config(tmp_path, *extra: str):
    return load_config(None, ["run.id=t1", f"store.uri={tmp_path / 'store'}", "k8s.store_claim=ielts-store",
                              f"k8s.namespace={NS}", "k8s.poll_s=0.2", "k8s.pending_grace_s=0", "k8s.wait_timeout_s=20",
                              "teacher.parallelism=2", "k8s.profile=cloud", *extra])


def _drive(emulator, config, scenarios=None, stages=("ingest", "teacher", "dataset"), backend=None, proxy=None,
           **kwargs):
    lines: list[str] = []
    cluster = FakeCluster(emulator, config, scenarios or {})
    cluster.proxy = proxy
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
    lines, cluster, error = _drive(emulator, config, {"ingest": "slow"}, stages=("ingest",))
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


def test_a_job_refused_by_admission_fails_with_the_failedcreate_message(emulator, tmp_path):
    config = _config(tmp_path)
    lines, cluster, error = _drive(emulator, config, {"dataset": "podsecurity"})
    assert error.startswith("stage dataset failed: FailedCreate (job ielts-t1-dataset): Error creating:")
    assert 'violates PodSecurity "restricted:latest"' in error and "\n" not in error
    assert f"kubectl -n {NS} describe job ielts-t1-dataset" in error


def test_an_exhausted_quota_is_waiting_until_the_wait_timeout(emulator, tmp_path):
    """Issue 28 #4: the pods start once GPUs free up, so a quota FailedCreate is waiting, not failing."""
    config = _config(tmp_path, "k8s.wait_timeout_s=3")
    lines, cluster, error = _drive(emulator, config, {"dataset": "quota"})
    waiting = [line for line in lines if line.startswith("[dataset] waiting: quota (Error creating:")]
    assert len(waiting) == 1 and "exceeded quota: ielts-distill-gpus" in waiting[0], lines
    assert error.startswith("stage dataset failed: Timeout (job ielts-t1-dataset): not finished after 3s")
    assert "still waiting: quota" in error and "\n" not in error


def test_quota_then_room_completes(emulator, tmp_path):
    config = _config(tmp_path)
    lines, cluster, error = _drive(emulator, config, {"dataset": "quota-then-room"})
    assert error is None, error
    assert any(line.startswith("[dataset] waiting: quota") for line in lines) and "[dataset] complete" in lines


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
    lines, cluster, error = _drive(emulator, running, {"ingest": "slow"}, stages=("ingest",))  # same config: re-attach
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
    emulator.seed_driver()
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


# --------------------------------------------------------------------------- issue 28: the operators' path


def _proxied(proxy, timeout_s: float, outage_s: float) -> KubeBackend:
    cfg = k.Configuration()
    cfg.host = proxy.url
    return KubeBackend(NS, k.ApiClient(cfg), timeout_s=timeout_s, outage_s=outage_s)


def test_the_driver_rides_out_an_api_outage_in_the_middle_of_a_watch(emulator, tmp_path):
    """#3, scaled down 30x: the line to the API is cut for 2 s (60 s) in the middle of a watch; reads retry
    with capped back-off for up to k8s.api_outage_s (20 s for 600 s) and re-attach; the run completes."""
    from tcp_proxy import TcpProxy

    config = _config(tmp_path, "k8s.api_outage_s=20")
    with TcpProxy(int(emulator.url.rsplit(":", 1)[1])) as proxy:
        lines, cluster, error = _drive(emulator, config, {"ingest": "outage"}, stages=("ingest", "teacher"),
                                       backend=_proxied(proxy, 1.0, 20.0), proxy=proxy)
    assert error is None, error
    assert proxy.downs == 2  # the cut, and the end of the with block
    assert [line for line in lines if "retrying for up to 20s (k8s.api_outage_s)" in line], lines
    assert [line for line in lines if "answers again after" in line], lines
    assert "[ingest] complete" in lines and "[teacher] complete" in lines  # the next stage after the outage


def test_a_longer_outage_exits_with_its_own_code_which_the_driver_job_retries(emulator, tmp_path):
    from tcp_proxy import TcpProxy

    from pipeline.k8s.client import ApiOutage
    from pipeline.k8s.objects import EXIT_API_OUTAGE, build_driver_job, to_dict

    config = _config(tmp_path)
    with TcpProxy(int(emulator.url.rsplit(":", 1)[1])) as proxy:
        cluster = FakeCluster(emulator, config, {"ingest": "cut"})
        cluster.proxy = proxy
        cluster.start()
        started = time.monotonic()
        try:
            with pytest.raises(ApiOutage) as info:
                run_pipeline(config, ["ingest"], backend=_proxied(proxy, 0.5, 1.5), echo=lambda line: None)
        finally:
            cluster.done.set()
            cluster.join(5)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert info.value.exit_code == EXIT_API_OUTAGE == 75 and "\n" not in message
    assert "unreachable for 1.5s (k8s.api_outage_s)" in message and "rerun to re-attach" in message
    rules = to_dict(build_driver_job(config, []))["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onExitCodes": {"containerName": "driver", "operator": "In", "values": [75]}} in rules
    fail = next(r for r in rules if r["action"] == "FailJob")  # a failed stage (exit 1) stays final
    assert fail["onExitCodes"]["values"] == [1, 2]  # (the next pod re-attaches: test_running_job_is_reattached...)


def test_a_job_with_a_queue_name_is_created_suspended_reported_queued_and_goes_on_when_admitted(emulator, tmp_path):
    """#5: without Kueue's webhook a GPU Job would start unqueued; created suspended, it waits for admission."""
    emulator.queues = {"team-a"}
    config = _config(tmp_path, "k8s.queue_name=team-a")
    lines, cluster, error = _drive(emulator, config, {"ingest": "admitted"}, stages=("ingest",))
    assert error is None, error
    assert cluster.suspended_at_creation is True
    queued = [line for line in lines if line.startswith("[ingest] queued (Kueue: couldn't assign flavors")]
    assert len(queued) == 1 and "[ingest] complete" in lines, lines


def _preflight_cli(emulator, tmp_path, *sets: str, command=("preflight",)):
    kubeconfig = _kubeconfig(tmp_path, kmock=emulator.url)
    args = [*command, "--kubeconfig", str(kubeconfig)]
    for item in ("run.id=t1", f"store.uri={tmp_path / 'store'}", "k8s.store_claim=ielts-store", f"k8s.namespace={NS}",
                 "k8s.poll_s=0.2", *sets):
        args += ["--set", item]
    return CliRunner().invoke(main, args)


def test_preflight_names_each_missing_thing_in_one_line(emulator, tmp_path):
    """#4: what would otherwise wait for days (a missing PVC, ServiceAccount, LocalQueue) or fail hours later."""
    ok = _preflight_cli(emulator, tmp_path)
    assert ok.exit_code == 0 and ok.output.strip().endswith("preflight: ok"), ok.output
    emulator.denied.add(("watch", "jobs"))
    bad = _preflight_cli(emulator, tmp_path, "k8s.data_claim=chart2text-data", "data.source=/data/sample",
                         "k8s.service_account=ielts-distill-job", "k8s.queue_name=team-a",
                         "k8s.gpu_resource=nvidia.com/mig-3g.40gb", "teacher.api_key_env=OTHER_KEY")
    assert bad.exit_code == 1
    lines = bad.output.strip().splitlines()
    expected = [
        f"permission: this identity may not watch jobs.batch in namespace {NS} (see k8s/base/driver-rbac.yaml)",
        f"ServiceAccount ielts-distill-job not found in {NS} (job ielts-t1-ingest; k8s/base/serviceaccounts.yaml)",
        "Secret ielts-distill-llm has no key OTHER_KEY (job ielts-t1-teacher reads it)",
        f"PersistentVolumeClaim chart2text-data not found in {NS} (job ielts-t1-ingest mounts it)",
        f"LocalQueue team-a not found in {NS} (k8s.queue_name; job ielts-t1-ingest)",
        "no node offers nvidia.com/mig-3g.40gb (jobs ielts-t1-finetune request it); a node pool that scales from "
        "zero: --set k8s.preflight=false"]
    assert lines == expected, lines
    assert not any("bm90LWEta2V5" in line or "not-a-key" in line for line in lines)  # no Secret value
    run = _preflight_cli(emulator, tmp_path, "k8s.queue_name=team-a", command=("run", "--executor", "k8s"))
    assert run.exit_code == 1 and f"preflight: LocalQueue team-a not found in {NS}" in run.output
    assert "no Job was created" in run.output and emulator.requests("create") == 0
    emulator.queues, emulator.denied = None, set()
    no_kueue = _preflight_cli(emulator, tmp_path, "k8s.queue_name=team-a")
    assert no_kueue.output.splitlines() == [
        "Kueue is not installed (the API serves no localqueues.kueue.x-k8s.io) but job ielts-t1-ingest names queue "
        "team-a (k8s.queue_name)"]
    submitted = _preflight_cli(emulator, tmp_path, command=("submit",))  # the driver's account is missing
    assert submitted.exit_code == 1 and emulator.requests("create") == 0
    assert f"ServiceAccount ielts-distill-driver not found in {NS} (job ielts-t1-driver" in submitted.output


def test_preflight_on_a_missing_namespace_says_so_once(tmp_path):
    emulator = Emulator()  # nothing seeded
    try:
        result = _preflight_cli(emulator, tmp_path)
    finally:
        emulator.close()
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"namespace {NS} does not exist: apply k8s/overlays/local or cloud (kubectl apply -k ...)"]


def test_an_in_cluster_driver_rides_out_an_outage_from_its_first_call(tmp_path, monkeypatch):
    """A driver pod restarted (exit 75) while the API is still away must not fail fast as a wrong context would."""
    from pipeline.k8s.client import ApiOutage

    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("t")
    ca.write_text("not read: nothing answers")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "9")  # nothing listens there
    from kubernetes.config import incluster_config

    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    backend = KubeBackend(NS, load_api_client(), timeout_s=0.3, outage_s=1.0, notify=lambda line: None)
    started = time.monotonic()
    with pytest.raises(ApiOutage, match=r"unreachable for 1s \(k8s.api_outage_s\)"):
        backend.read_job("ielts-t1-ingest")
    assert time.monotonic() - started >= 1.0
