"""Kubernetes objects, overlays, images and the Job entrypoint, checked without an API server.

Every rendered object (``ielts-distill render`` for both profiles, both kustomize overlays) is validated
with kubernetes-validate --strict against the newest bundled Kubernetes schema, then checked for what the
design requires: GPU requests and node selection on finetune, Indexed sharded stages, restricted Pod
Security, requests and limits everywhere, and no secret value anywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from pipeline import __version__
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.k8s.objects import build_job, build_run, image, to_dict
from pipeline.stages import STAGES
from pipeline.stages import spec as stage_spec

REPO = Path(__file__).resolve().parents[1]
K8S_VERSION = kubernetes_validate.latest_version()
CLOUD = REPO / "configs" / "cluster.yaml"
LOCAL = REPO / "k8s" / "overlays" / "local" / "run.yaml"
FAKE_KEY = "sk-FAKE-teacher-key-7f3a9c1e"  # must never show up in anything rendered or stored
FAKE_S3 = "FAKE-s3-secret-0d1b2e3f"


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def _validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises ValidationError with the path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """``ielts-distill render`` output for the cloud and the kind/minikube configs, fake secrets in env."""
    out = {}
    env = {"MINIMAX_API_KEY": FAKE_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_S3, "AWS_ACCESS_KEY_ID": "FAKEID"}
    for name, config in (("cloud", CLOUD), ("local", LOCAL)):
        folder = tmp_path_factory.mktemp(f"render-{name}")
        result = CliRunner().invoke(main, ["render", "--config", str(config), "-o", str(folder)], env=env)
        assert result.exit_code == 0, result.output
        files = sorted(folder.glob("0*.yaml"))
        assert [line for line in result.output.splitlines()] == [str(f) for f in files]
        kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
        assert kust["resources"] == [f.name for f in files]
        text = "---\n".join(f.read_text() for f in files)
        assert FAKE_KEY not in text and FAKE_S3 not in text
        out[name] = _docs(text)
        if shutil.which("kubectl"):  # the folder is a kustomization: kubectl apply -k DIR
            proc = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0 and len(_docs(proc.stdout)) == len(files), proc.stderr
    return out


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to render k8s/overlays")
    out = {}
    for name in ("local", "cloud"):
        proc = subprocess.run([kubectl, "kustomize", str(REPO / "k8s" / "overlays" / name)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        out[name] = _docs(proc.stdout)
    return out


def _jobs(objs: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["labels"]["ielts-distill/stage"]: o for o in objs if o["kind"] == "Job"}


def _pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    specs = []
    for o in objs:
        if o["kind"] in ("Job", "Deployment"):
            specs.append((o["metadata"]["name"], o["spec"]["template"]["spec"]))
        elif o["kind"] == "Pod":
            specs.append((o["metadata"]["name"], o["spec"]))
    return specs


def assert_restricted(name: str, spec: dict) -> None:
    """The 'restricted' Pod Security Standard, plus requests/limits and a read-only root filesystem."""
    pod_sc = spec.get("securityContext") or {}
    assert pod_sc.get("runAsNonRoot") is True, name
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
    assert all("hostPath" not in v for v in spec.get("volumes") or []), name
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c.get("securityContext") or {}
        assert sc.get("allowPrivilegeEscalation") is False, (name, c["name"])
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], (name, c["name"])
        assert sc.get("readOnlyRootFilesystem") is True, (name, c["name"])
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, (name, c["name"])
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind) or {}), (name, c["name"], kind)
        image_ref = c["image"]
        assert ":" in image_ref.rsplit("/", 1)[-1] and not image_ref.endswith(":latest"), image_ref


def test_rendered_objects_pass_strict_schema_validation(rendered):
    for name, objs in rendered.items():
        assert [o["kind"] for o in objs] == ["ConfigMap"] + ["Job"] * len(STAGES), name
        for obj in objs:
            _validate(obj)


def test_overlays_render_and_pass_strict_schema_validation(overlays):
    kinds = {name: sorted({o["kind"] for o in objs}) for name, objs in overlays.items()}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Job", "Namespace"} <= set(kinds["local"])
    assert "ResourceQuota" in kinds["cloud"] and "Deployment" not in kinds["cloud"]  # external S3 in the cloud
    for objs in overlays.values():
        for obj in objs:
            _validate(obj)
            assert obj["kind"] in ("Namespace", "ClusterRole", "ClusterRoleBinding") or obj["metadata"]["namespace"] == "ielts-distill"


def test_every_workload_is_restricted_with_requests_and_limits(rendered, overlays):
    specs = [s for objs in (*rendered.values(), *overlays.values()) for s in _pod_specs(objs)]
    assert len(specs) == 2 * len(STAGES) + 3  # Jobs of both configs + SeaweedFS, bucket Job, data loader
    for name, spec in specs:
        assert_restricted(name, spec)
    ns = next(o for o in overlays["local"] if o["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_job_defaults_labels_and_writable_paths(rendered):
    config = load_config(CLOUD)
    for stage, job in _jobs(rendered["cloud"]).items():
        spec = job["spec"]
        retries = "backoffLimitPerIndex" if spec.get("completionMode") == "Indexed" else "backoffLimit"
        assert spec[retries] == config.k8s.backoff_limit
        assert spec["podReplacementPolicy"] == "Failed"
        assert spec["activeDeadlineSeconds"] == config.k8s.active_deadline_s
        assert spec["ttlSecondsAfterFinished"] == config.k8s.ttl_after_finished_s
        rules = spec["podFailurePolicy"]["rules"]
        assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2]
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        for labels in (job["metadata"]["labels"], spec["template"]["metadata"]["labels"]):
            assert labels["app.kubernetes.io/name"] == "ielts-distill"
            assert labels["app.kubernetes.io/component"] == labels["ielts-distill/stage"] == stage
            assert labels["ielts-distill/run"] == labels["app.kubernetes.io/instance"] == config.run.id
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert {"/tmp", "/var/cache/ielts-distill", "/etc/ielts-distill"} <= set(mounts)
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_HOME"]["value"].startswith("/var/cache/ielts-distill")
        assert container["args"] == [stage] and container["image"] == image(config, stage_spec(stage))
        if stage == "ingest":
            assert mounts[config.k8s.data_mount]["readOnly"] is True  # k8s.data_claim


def test_indexed_stages_and_shard_count(rendered):
    config = load_config(CLOUD)
    jobs = _jobs(rendered["cloud"])
    expected = {"teacher": config.teacher.parallelism, "generate": config.generate.parallelism,
                "judge": config.judge.parallelism, "finetune": len(config.finetune.units())}  # variants x seeds
    assert expected["teacher"] == 4
    for stage, job in jobs.items():
        spec = job["spec"]
        env = {e["name"]: e.get("value") for e in spec["template"]["spec"]["containers"][0]["env"]}
        if stage in expected:
            n = expected[stage]
            assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", n, n), stage
            assert env["JOB_COMPLETION_COUNT"] == str(n)
        else:
            assert "completionMode" not in spec and "JOB_COMPLETION_COUNT" not in env, stage


def test_gpu_requests_node_selection_and_cpu_profile(rendered):
    cloud, local = _jobs(rendered["cloud"]), _jobs(rendered["local"])
    config = load_config(CLOUD)
    for stage in ("finetune", "generate"):  # cluster.yaml: finetune.gpus 1, generate.gpus 1
        pod = cloud[stage]["spec"]["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"] == config.k8s.gpu_node_selector
        assert pod["nodeSelector"]["nvidia.com/gpu.product"].startswith("NVIDIA-H100")
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["containers"][0]["image"].endswith(f"/{stage}-cuda:{config.k8s.image_tag}")
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])  # /dev/shm
    for stage in ("ingest", "teacher", "judge", "report"):
        pod = cloud[stage]["spec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"] and "nodeSelector" not in pod
    for stage, job in local.items():  # k8s.profile=cpu: kind/minikube drop every GPU request
        pod = job["spec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"], stage
        assert "nodeSelector" not in pod and "tolerations" not in pod and "-cuda" not in pod["containers"][0]["image"]


def test_secrets_are_only_referenced(rendered, overlays, tmp_path, monkeypatch):
    config = load_config(CLOUD)
    teacher = _jobs(rendered["cloud"])["teacher"]["spec"]["template"]["spec"]["containers"][0]
    key = next(e for e in teacher["env"] if e["name"] == config.teacher.api_key_env)
    assert key == {"name": "MINIMAX_API_KEY",
                   "valueFrom": {"secretKeyRef": {"name": "ielts-distill-llm", "key": "MINIMAX_API_KEY"}}}
    assert teacher["envFrom"] == [{"secretRef": {"name": "ielts-distill-s3"}}]
    judge = _jobs(rendered["cloud"])["judge"]["spec"]["template"]["spec"]["containers"][0]
    assert any(e["name"] == "MINIMAX_API_KEY" and "secretKeyRef" in e["valueFrom"] for e in judge["env"])
    embedded = _jobs(rendered["local"])["teacher"]["spec"]["template"]["spec"]["containers"][0]
    ref = next(e for e in embedded["env"] if e["name"] == "LOCAL_LLM_API_KEY")["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True  # the embedded server needs no key: pods start without that Secret
    for objs in (*rendered.values(), *overlays.values()):
        assert not [o for o in objs if o["kind"] == "Secret"]
        text = yaml.safe_dump_all(objs)
        assert FAKE_KEY not in text and FAKE_S3 not in text
    # the stored run config and the ConfigMap's copy of it hold env var names, never values
    monkeypatch.setenv("MINIMAX_API_KEY", FAKE_KEY)
    cm = to_dict(build_run(config)[0])
    assert "MINIMAX_API_KEY" in cm["data"]["config.yaml"] and FAKE_KEY not in cm["data"]["config.yaml"]


def test_config_errors_are_one_line(tmp_path):
    bad = load_config(None, ["k8s.resources={finetune: {memory: lots}}"])
    with pytest.raises(ConfigError, match=r"k8s.resources.finetune.memory: 'lots' is not a Kubernetes quantity"):
        build_job(bad, "finetune")
    result = CliRunner().invoke(main, ["render", "--set", "store.uri=./artifacts", "-o", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith("error: store.uri './artifacts': Jobs need a store")
    ok = load_config(None, [f"store.uri={tmp_path}", "k8s.store_claim=shared", "k8s.resources={dataset: {memory: 3Gi}}"])
    job = to_dict(build_job(ok, "dataset"))
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["memory"] == "3Gi"
    assert {"name": "store", "mountPath": str(tmp_path)} in container["volumeMounts"]


def test_dockerfiles_lint_clean_with_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    files = sorted((REPO / "images").glob("*/Dockerfile"))
    assert {f.parent.name for f in files} == {"base", "stage"}
    proc = subprocess.run([hadolint, *map(str, files)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for f in files:
        text = f.read_text()
        assert "USER 10001" in text and ":latest" not in text, f
    assert "ENV IELTS_STAGE=${STAGE}" in (REPO / "images" / "stage" / "Dockerfile").read_text()


# --------------------------------------------------------------------------- the Job entrypoint


def _entrypoint(tmp_path: Path, config_text: str | None, *args: str, **env: str) -> subprocess.CompletedProcess:
    config = tmp_path / "config.yaml"
    if config_text is not None:
        config.write_text(config_text)
    full_env = {**os.environ, "IELTS_CONFIG": str(config), "IELTS_TERMINATION_LOG": str(tmp_path / "term.log"),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    if "JOB_COMPLETION_INDEX" not in env:  # the outer environment must not turn this into a shard
        full_env.pop("JOB_COMPLETION_INDEX", None)
    return subprocess.run([sys.executable, str(REPO / "jobs" / "entrypoint.py"), *args], env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_entrypoint_runs_the_stage_and_ends_with_a_clear_line(tmp_path, sample_dir):
    store = tmp_path / "store"
    text = yaml.safe_dump({"run": {"id": "ep"}, "store": {"uri": str(store)},
                           "data": {"source": str(sample_dir), "limit": 4}})
    proc = _entrypoint(tmp_path, text, "ingest")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last == "ielts-distill job: stage ingest finished OK"
    assert (store / "ep" / "ingest" / "_SUCCESS").is_file()
    assert (tmp_path / "term.log").read_text().strip() == last


def test_entrypoint_failures_name_the_cause(tmp_path):
    text = yaml.safe_dump({"run": {"id": "ep"}, "store": {"uri": str(tmp_path / "store")},
                           "data": {"source": str(tmp_path / "nowhere")}})
    proc = _entrypoint(tmp_path, text, "ingest", JOB_COMPLETION_INDEX="0", JOB_COMPLETION_COUNT="1")
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 1
    assert last.startswith("ielts-distill job: stage ingest shard 0/1 FAILED (exit 1): error: data.source")
    assert (tmp_path / "term.log").read_text().strip() == last
    (tmp_path / "none").mkdir()
    missing = _entrypoint(tmp_path / "none", None, "ingest")
    assert missing.returncode == 2 and "run config" in missing.stdout and "ConfigMap" in missing.stdout
    bad = _entrypoint(tmp_path, "run: {id: ep}\nk8s: {nope: 1}\n", "report")
    assert bad.returncode == 2 and "k8s.nope: unknown key" in bad.stdout.strip().splitlines()[-1]


# --------------------------------------------------------------------------- issue 28 #7: versions and identity


def _minors(low: str) -> list[str]:
    """Every minor kubernetes-validate knows from ``low`` up (e.g. 1.29.0 ... 1.37.0)."""
    known = sorted(set(kubernetes_validate.utils.all_versions()), key=lambda v: tuple(map(int, v.split("."))))
    return [v for v in known if tuple(map(int, v.split(".")[:2])) >= tuple(map(int, low.split(".")))]


def _objects_of_every_kind() -> list[dict]:
    from pipeline.k8s.objects import build_driver_job

    out = []
    for path, sets in ((LOCAL, []), (CLOUD, []), (CLOUD, ["k8s.queue_name=team-a", "k8s.image_pull_secrets=[regcred]"])):
        config = load_config(path, sets)
        out += [to_dict(o) for o in build_run(config)] + [to_dict(build_driver_job(config, ["--from", "teacher"]))]
    return out


def test_every_rendered_object_is_valid_on_each_supported_minor_and_not_below():
    from pipeline.k8s.objects import MIN_KUBERNETES

    minors = _minors(MIN_KUBERNETES)
    assert minors[0] == f"{MIN_KUBERNETES}.0" and len(minors) >= 8, minors
    objects = _objects_of_every_kind()
    for version in minors:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)
    older = f"1.{int(MIN_KUBERNETES.split('.')[1]) - 1}.0"  # the minimum is real: the Jobs fail one minor below
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(to_dict(build_job(load_config(CLOUD), "teacher")), older, strict=True)
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    assert f"Kubernetes {MIN_KUBERNETES} or newer" in docs and f"Kubernetes {MIN_KUBERNETES} or newer" in \
        (REPO / "README.md").read_text()


def test_images_by_digest_when_the_build_recorded_one(tmp_path):
    digest = "sha256:" + "ab" * 32
    recorded = tmp_path / "digests.txt"
    recorded.write_text(f"teacher {digest}\nbase sha256:{'cd' * 32}\n")
    config = load_config(LOCAL, [f"k8s.image_digests={recorded}"])
    assert image(config, stage_spec("teacher")) == f"ghcr.io/ielts-distill/teacher@{digest}"
    assert image(config, stage_spec("ingest")) == f"ghcr.io/ielts-distill/ingest:{__version__}"  # no digest recorded: the tag
    from pipeline.k8s.objects import build_driver_job

    driver = to_dict(build_driver_job(config, []))["spec"]["template"]["spec"]["containers"][0]
    assert driver["image"] == f"ghcr.io/ielts-distill/base@sha256:{'cd' * 32}"
    assert load_config(None, ["k8s.image_digests.judge=" + digest]).k8s.image_digests == {"judge": digest}
    recorded.write_text("teacher latest\n")
    with pytest.raises(ConfigError, match="image_digests") as info:
        load_config(LOCAL, [f"k8s.image_digests={recorded}"])
    assert "\n" not in str(info.value) and "NAME sha256:<64 hex>" in str(info.value)


def test_build_sh_pushes_and_records_each_digest(tmp_path):
    """IMAGE_PUSH=1: each image is pushed after its build and its digest recorded (a stub buildah answers)."""
    log = tmp_path / "calls"
    stub = tmp_path / "buildah"
    stub.write_text(f"""#!/bin/sh
echo "$*" >> {log}
case "$*" in *push*) for a; do [ "$prev" = --digestfile ] && printf 'sha256:%064d' 7 > "$a"; prev="$a"; done ;; esac
""")
    stub.chmod(0o755)
    digests = tmp_path / "out" / "d.txt"
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "BUILDER": "buildah", "IMAGE_PUSH": "1",
           "IMAGE_STAGES": "ingest", "IMAGE_CUDA": "0", "IMAGE_DIGESTS": str(digests), "PYTHON": sys.executable}
    proc = subprocess.run(["sh", str(REPO / "images" / "build.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert digests.read_text().splitlines() == [f"base sha256:{7:064d}", f"ingest sha256:{7:064d}"]
    pushes = [line for line in log.read_text().splitlines() if " push " in f" {line}"]
    assert [p.split()[-1] for p in pushes] == [f"ghcr.io/ielts-distill/base:{__version__}", f"ghcr.io/ielts-distill/ingest:{__version__}"]
    config = load_config(LOCAL, [f"k8s.image_digests={digests}"])
    assert image(config, stage_spec("ingest")) == f"ghcr.io/ielts-distill/ingest@sha256:{7:064d}"


def test_the_driver_role_grants_what_the_code_calls_and_says_the_truth_about_secrets():
    from pipeline.k8s.preflight import DRIVER_RIGHTS

    rbac = [d for d in _docs((REPO / "k8s" / "base" / "driver-rbac.yaml").read_text())]
    role = next(d for d in rbac if d["kind"] == "Role")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    for verb, group, resource, sub in DRIVER_RIGHTS:
        assert (group, resource + (f"/{sub}" if sub else ""), verb) in granted, (verb, group, resource, sub)
    for resource in ("serviceaccounts", "persistentvolumeclaims", "secrets"):  # preflight's reads
        assert ("", resource, "get") in granted
    secrets = next(rule for rule in role["rules"] if "secrets" in rule["resources"])
    assert secrets["resourceNames"] == ["ielts-distill-s3", "ielts-distill-llm"] and secrets["verbs"] == ["get"]
    assert ("kueue.x-k8s.io", "localqueues", "get") in granted
    nodes = next(d for d in rbac if d["kind"] == "ClusterRole")
    assert nodes["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}]
    text = (REPO / "k8s" / "base" / "driver-rbac.yaml").read_text() + (REPO / "docs" / "kubernetes.md").read_text()
    assert "No access to Secrets" not in text and "no access to Secrets" not in text
    assert "can mount every Secret of that namespace" in text and "namespace of its own" in text
