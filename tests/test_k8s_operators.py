"""Issue 15, the operators' path: each test reproduces what an operator following docs/kubernetes.md ran into
(data one folder too deep, llama.cpp's missing libgomp, Jobs that never fit a kind node, an unpatched MinIO,
no .dockerignore) and checks the per-stage knobs operators expect (Kueue, scheduling, pull secrets, MIG,
env from Secrets, the model cache, the driver Job)."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import kubernetes_validate
import yaml

from pipeline.config import load_config
from pipeline.k8s.objects import build_driver_job, build_job, to_dict
from pipeline.stages import STAGES, spec

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "k8s" / "overlays" / "local" / "run.yaml"
CLOUD = REPO / "configs" / "cluster.yaml"
DOCS = (REPO / "docs" / "kubernetes.md").read_text()


def _overlay(name: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render k8s/overlays"
    proc = subprocess.run([kubectl, "kustomize", str(REPO / "k8s" / "overlays" / name)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _pod(job) -> dict:
    return to_dict(job)["spec"]["template"]["spec"]


def _quantity(value: str) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units[unit]


def test_1_the_documented_data_copy_lands_where_ingest_reads(tmp_path, sample_dir):
    """kubectl cp DIR pod:DEST creates DEST (the loader mounts the volume at /data); the ingest Job must see
    data.source through its own mount of the same volume."""
    src, dest = re.search(r"kubectl -n \S+ cp (\S+) data-loader:(\S+)", DOCS).groups()
    loader = next(o for o in _overlay("local") if o["kind"] == "Pod" and o["metadata"]["name"] == "data-loader")
    loader_mount = loader["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
    volume = tmp_path / "pvc"
    shutil.copytree(sample_dir, volume / PurePosixPath(dest).relative_to(loader_mount))
    config = load_config(LOCAL)
    mount = next(m for m in _pod(build_job(config, "ingest"))["containers"][0]["volumeMounts"] if m["name"] == "data")
    seen = volume / mount.get("subPath", "") / PurePosixPath(config.data.source).relative_to(mount["mountPath"])
    assert (seen / "manifest.jsonl").is_file(), f"ingest reads {seen}, the copy went to {dest}"
    assert Path(src).name == PurePosixPath(config.data.source).name


def test_2_every_shared_library_llama_cpp_links_is_in_the_runtime_image():
    import llama_cpp

    slim_base = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libstdc++.so.6",
                 "libgcc_s.so.1", "linux-vdso.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}
    package = {"libgomp.so.1": "libgomp1"}
    lib_dir = Path(llama_cpp.__file__).parent
    needed = set()
    for so in lib_dir.rglob("*.so*"):
        out = subprocess.run(["ldd", str(so)], capture_output=True, text=True, timeout=30, check=False).stdout
        for line in out.splitlines():
            name, _, where = line.strip().partition(" => ")
            name = name.split()[0]
            if str(lib_dir) not in where and PurePosixPath(name).name not in slim_base:
                needed.add(PurePosixPath(name).name)
    assert "libgomp.so.1" in needed  # llama.cpp's CPU backend: OpenMP
    dockerfile = (REPO / "images" / "base" / "Dockerfile").read_text()
    runtime = dockerfile[dockerfile.index("AS runtime"):]
    for lib in sorted(needed):
        assert lib in package, f"{lib}: a shared library llama_cpp links; add its Debian package to the runtime stage"
        assert re.search(rf"apt-get install[^\n]*\b{package[lib]}\b", runtime), f"{package[lib]} ({lib}) not installed"


def test_4_every_local_job_fits_a_two_core_kind_node():
    """A kind node with 2 CPUs and 8 GiB: kube-system asks ~950m CPU / ~400Mi, the store server its own."""
    store = next(o for o in _overlay("local") if o["kind"] == "Deployment")
    store_req = store["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    free_cpu = 2.0 - 0.95 - _quantity(store_req["cpu"])
    free_mem = 8 * 2**30 - 400 * 2**20 - _quantity(store_req["memory"]) - 1 * 2**30  # docker's own share
    config = load_config(LOCAL)
    for stage in STAGES:
        pods = spec(stage).shard_count(config) or 1
        req = _pod(build_job(config, stage))["containers"][0]["resources"]["requests"]
        assert pods * _quantity(req["cpu"]) <= free_cpu, (stage, pods, req)
        assert pods * _quantity(req["memory"]) <= free_mem, (stage, pods, req)


def test_9_local_store_is_the_tests_seaweedfs_and_minio_is_a_patched_release():
    weed = shutil.which("weed") or str(Path(__import__("sys").executable).parent / "weed")
    version = re.search(r"(\d+\.\d+)", subprocess.run([weed, "version"], capture_output=True, text=True,
                                                      timeout=30, check=False).stdout).group(1)
    local = {o["metadata"]["name"]: o for o in _overlay("local") if o["kind"] == "Deployment"}
    assert set(local) == {"seaweedfs"}
    assert local["seaweedfs"]["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":{version}")
    minio = {o["metadata"]["name"]: o for o in _overlay("local-minio") if o["kind"] == "Deployment"}
    assert set(minio) == {"minio"}
    tag = minio["minio"]["spec"]["template"]["spec"]["containers"][0]["image"].rsplit("RELEASE.", 1)[1]
    assert tag >= "2025-10-15T17-29-55Z"  # MinIO's October 2025 security release or later
    for objs in (_overlay("local"), _overlay("local-minio")):
        service = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "s3")
        pods = [o for o in objs if o["kind"] == "Deployment"]
        assert all(p["spec"]["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()
                   for p in pods)
    assert load_config(LOCAL).k8s.s3_endpoint == "http://s3.ielts-distill.svc.cluster.local:9000"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; '!' re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat) or fnmatch.fnmatch(path, pat.replace("**/", "*/"))
               for i in range(len(parts))):
            ignored = not negate
    return ignored


def test_9_dockerignore_sends_only_what_the_dockerfiles_copy():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/HEAD", "artifacts/x", "tests/x.py",
                 "pipeline/__pycache__/cli.cpython-311.pyc", "shared/data/x.png"):
        assert _ignored(path, patterns), path
    for dockerfile in (REPO / "images").glob("*/Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                for src in line.split()[1:-1]:
                    assert not _ignored(src.rstrip("/"), patterns), (dockerfile.name, src)
                    assert not _ignored(f"{src.rstrip('/')}/x.py", patterns) or not (REPO / src).is_dir(), src


def test_kueue_scheduling_pull_secrets_mig_and_env_secrets():
    config = load_config(CLOUD, [
        "k8s.queue_name=team-gpu", "k8s.priority_class=batch-low", "k8s.image_pull_secrets=[regcred]",
        "k8s.gpu_resource=nvidia.com/mig-3g.40gb", "k8s.env_secrets=[ielts-distill-hf, proxy]",
        "k8s.scheduling={judge: {node_selector: {pool: cpu-spot}, "
        "tolerations: [{key: spot, operator: Exists, effect: NoSchedule}]}}"])
    for stage in STAGES:
        job = to_dict(build_job(config, stage))
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpu"
        pod = job["spec"]["template"]["spec"]
        assert pod["priorityClassName"] == "batch-low" and pod["imagePullSecrets"] == [{"name": "regcred"}]
        env_from = [e["secretRef"]["name"] for e in pod["containers"][0]["envFrom"]]
        assert env_from == ["ielts-distill-s3", "ielts-distill-hf", "proxy"]
        limits = pod["containers"][0]["resources"]["limits"]
        if spec(stage).gpu_count(config):
            assert limits["nvidia.com/mig-3g.40gb"] == "1" and "nvidia.com/gpu" not in limits
            assert pod["nodeSelector"] == config.k8s.gpu_node_selector
        elif stage == "judge":
            assert pod["nodeSelector"] == {"pool": "cpu-spot"} and "affinity" not in pod
            assert pod["tolerations"] == [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]
        else:  # CPU stages keep off GPU nodes
            term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert term["nodeSelectorTerms"][0]["matchExpressions"][0]["key"] == "nvidia.com/gpu.present"


def test_sharded_stages_retry_per_index_and_deterministic_errors_fail_fast():
    config = load_config(CLOUD)
    for stage in STAGES:
        js = to_dict(build_job(config, stage))["spec"]
        assert js["podReplacementPolicy"] == "Failed"
        rules = js["podFailurePolicy"]["rules"]
        assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": stage, "operator": "In",
                                                                  "values": [2]}}
        if spec(stage).shard_count(config):
            assert js["backoffLimitPerIndex"] == config.k8s.backoff_limit and "backoffLimit" not in js
            assert js["maxFailedIndexes"] == js["completions"]
        else:
            assert js["backoffLimit"] == config.k8s.backoff_limit


def test_model_cache_claim_mounts_the_hub_cache():
    config = load_config(CLOUD, ["k8s.model_cache_claim=ielts-distill-models"])
    pod = _pod(build_job(config, "finetune"))
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "ielts-distill-models"}} in pod["volumes"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert {"name": "models", "mountPath": env["HF_HOME"]} in pod["containers"][0]["volumeMounts"]
    cloud = _overlay("cloud")
    pvc = next(o for o in cloud if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "ielts-distill-models")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # finetune's two pods may sit on two nodes
    assert load_config(CLOUD).k8s.model_cache_claim == "ielts-distill-models"


def test_driver_job_is_valid_restricted_and_uses_the_driver_account():
    config = load_config(LOCAL)
    job = to_dict(build_driver_job(config, ["--only", "report"]))
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["serviceAccountName"] == "ielts-distill-driver" and pod["securityContext"]["runAsNonRoot"] is True
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert container["command"][-2:] == ["--only", "report"]
    rbac = next(o for o in _overlay("local") if o["kind"] == "Role" and o["metadata"]["name"] == "ielts-distill-driver")
    granted = {(r, v) for rule in rbac["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert {("events", "list"), ("jobs", "create"), ("configmaps", "get"), ("pods/log", "get")} <= granted
