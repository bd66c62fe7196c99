"""``make images-test`` (CI with CI_IMAGES=1): a stage image that images/test.sh built with buildah runs its
own entrypoint against the test S3 server (``buildah run``), so a missing shared library, file or package in
the image fails CI, not the cluster. Not named test_*.py: the normal suite does not build images; the
Makefile passes this file to pytest explicitly."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.k8s.images import PLAN_FILE, read_plan
from pipeline.stages import spec
from pipeline.store import open_store

REPO = Path(__file__).resolve().parents[1]


def _buildah(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    driver = os.environ.get("BUILDAH_STORAGE_DRIVER", "vfs")
    return subprocess.run(["buildah", "--storage-driver", driver, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_stage_image_runs_its_entrypoint_against_s3(s3_bucket, s3_server, sample_dir, tmp_path):
    image = os.environ["IMAGE_TEST_REF"]  # set by images/test.sh
    stage = os.environ.get("IMAGE_TEST_STAGE", "ingest")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"run": {"id": "img"}, "store": {"uri": s3_bucket},
                                      "data": {"source": "/data/chart2text-sample", "limit": 4}}))
    config.chmod(0o644)
    ctr = _buildah("from", image)
    assert ctr.returncode == 0, ctr.stderr
    name = ctr.stdout.strip()
    try:
        env = [f"--env={k}={os.environ[k]}" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                     "AWS_ENDPOINT_URL_S3", "AWS_REGION")]
        proc = _buildah("run", "--isolation", os.environ.get("BUILDAH_ISOLATION", "chroot"), *env,
                        f"--volume={config}:/etc/ielts-distill/config.yaml:ro",
                        f"--volume={sample_dir}:/data/chart2text-sample:ro",
                        name, "--", "python", "/app/jobs/entrypoint.py", stage)
    finally:
        _buildah("rm", name)
    out = proc.stdout.strip().splitlines()
    if not spec(stage).inputs:  # ingest: the whole stage runs
        assert proc.returncode == 0 and out and out[-1] == f"ielts-distill job: stage {stage} finished OK", \
            proc.stdout[-2000:] + proc.stderr[-2000:]
        assert open_store(s3_bucket).exists(f"img/{stage}/_SUCCESS")
    else:  # the stage's code loads in the image and stops, deterministically, at its missing inputs
        assert proc.returncode == 2 and out and "error: stage" in out[-1] and "needs stage" in out[-1], \
            proc.stdout[-2000:] + proc.stderr[-2000:]


# a check, run inside the image, for each thing StageSpec.image_needs can ask for
NEED_CHECKS = {
    "local-llm": "import llama_cpp, llama_cpp.llama_cpp",  # loads libllama (and libgomp, which it links)
    "smollm2-gguf": "from pipeline.config import LLMSection; from pipeline.llm.server import find_gguf; "
                    "assert find_gguf(LLMSection()).stat().st_size > 50e6",
    "cuda": "import torch; assert torch.version.cuda, 'a CPU build of torch'",
}


def _stages() -> list[str]:
    return (os.environ.get("IMAGE_TEST_STAGES") or os.environ.get("IMAGE_TEST_STAGE", "ingest")).split()


@pytest.mark.parametrize("stage", _stages())
def test_stage_image_holds_what_its_stage_needs(stage):
    """Everything the image plan says the stage's image holds (what the stage needs under the configs it
    serves) is there: llama.cpp loads with its shared libraries, the GGUF is found, torch has CUDA."""
    registry, tag = os.environ["IMAGE_TEST_REF"].rsplit("/", 1)[0], os.environ["IMAGE_TEST_REF"].rsplit(":", 1)[1]
    (image,) = [i for i in read_plan((REPO / PLAN_FILE).read_text()) if i.stage == stage and not i.cuda]
    code = "; ".join(["import pipeline.stages." + stage, *(NEED_CHECKS[n] for n in sorted(image.holds))])
    ctr = _buildah("from", f"{registry}/{image.name}:{tag}")
    assert ctr.returncode == 0, ctr.stderr
    try:
        proc = _buildah("run", "--isolation", os.environ.get("BUILDAH_ISOLATION", "chroot"), ctr.stdout.strip(),
                        "--", "python", "-c", code)
    finally:
        _buildah("rm", ctr.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-2000:]


def pod_as_buildah_run(job: dict, index: int | None, entrypoint: list[str], secrets: dict[str, dict[str, str]],
                       volumes: dict[str, str]) -> list[str]:
    """``buildah run`` options and command that run a rendered Job's container as its pod would: the pod's
    user and group, the container's env (values, ``secretKeyRef`` and ``envFrom`` resolved from ``secrets``;
    an optional key that is missing stays unset, a required one fails), ``JOB_COMPLETION_INDEX`` for an
    Indexed Job, each volume (``volumes``: name -> host folder) at its mount path (read-only where mounted
    so), and its command: the container's, else the image's entrypoint, then its args."""
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    user = pod["securityContext"]
    opts = [f"--user={user['runAsUser']}:{user['runAsGroup']}"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        env.update(secrets[source["secretRef"]["name"]])
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        value = secrets.get(ref["name"], {}).get(ref["key"])
        assert value is not None or ref.get("optional"), f"secret {ref['name']} lacks key {ref['key']}"
        if value is not None:
            env[var["name"]] = value
    if index is not None:
        env["JOB_COMPLETION_INDEX"] = str(index)
    opts += [f"--env={key}={value}" for key, value in env.items()]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    for volume in pod["volumes"]:
        mount = mounts[volume["name"]]
        opts.append(f"--volume={volumes[volume['name']]}:{mount['mountPath']}" + (":ro" if mount.get("readOnly") else ""))
    return [*opts, "--", *(container.get("command") or entrypoint), *(container.get("args") or [])]
