"""Images come from the StageSpecs: one stage Dockerfile, build.sh's plan, the generated skaffold.yaml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from pipeline import __version__
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.k8s.images import plan
from pipeline.k8s.objects import image
from pipeline.stages import SPECS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"local": REPO / "k8s" / "overlays" / "local" / "run.yaml", "cloud": REPO / "configs" / "cluster.yaml"}


def _build_sh(**env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "BUILDER": "print", "PYTHON": sys.executable, **env}
    return subprocess.run(["sh", str(REPO / "images" / "build.sh")], env=full, capture_output=True, text=True,
                          timeout=60)


def _builds(out: str) -> dict[str, str]:
    """image -> its build command line, from BUILDER=print output."""
    lines = [ln for ln in out.splitlines() if ln.startswith("build ")]
    return {ln.split("--tag ")[1].split()[0]: ln for ln in lines}


def test_build_sh_builds_one_image_per_stage_from_the_one_stage_dockerfile():
    proc = _build_sh(IMAGE_TAG="9.9")
    assert proc.returncode == 0, proc.stderr
    builds = _builds(proc.stdout)
    reg = "ghcr.io/ielts-distill"
    for s in SPECS:
        line = builds[f"{reg}/{s.name}:9.9"]
        assert "--file images/stage/Dockerfile" in line and f"STAGE={s.name}" in line
        base = "-".join(("base", *s.extras))
        assert f"BASE_IMAGE={reg}/{base}:9.9" in line
        if s.cuda:
            assert f"BASE_IMAGE={reg}/base-cuda:9.9" in builds[f"{reg}/{s.name}-cuda:9.9"]
    assert "EXTRAS=local-llm" in builds[f"{reg}/base-local-llm:9.9"]
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cu128" in builds[f"{reg}/base-cuda:9.9"]
    assert len(builds) == len(plan())
    assert list(builds) == [f"{reg}/{i.name}:9.9" for i in plan()]  # every base before the stages on it


def test_build_sh_one_stage_without_cuda_and_no_host_pip_settings():
    proc = _build_sh(IMAGE_STAGES="judge", IMAGE_CUDA="0", PIP_FIND_LINKS="/home/me/wheels",
                     IMAGE_PIP_FIND_LINKS="/srv/wheels")
    assert proc.returncode == 0, proc.stderr
    builds = _builds(proc.stdout)
    assert set(builds) == {f"ghcr.io/ielts-distill/base-local-llm:{__version__}", f"ghcr.io/ielts-distill/judge:{__version__}"}
    assert "/home/me/wheels" not in proc.stdout  # pip's own setting on the host stays on the host
    assert "PIP_FIND_LINKS=/srv/wheels" in builds[f"ghcr.io/ielts-distill/base-local-llm:{__version__}"]
    bad = _build_sh(IMAGE_STAGES="nope")
    assert bad.returncode == 2 and "unknown stage 'nope'" in bad.stderr


def test_only_the_base_and_one_stage_dockerfile_and_no_duplicates():
    assert sorted(str(p.relative_to(REPO)) for p in (REPO / "images").glob("*/Dockerfile")) == \
        ["images/base/Dockerfile", "images/stage/Dockerfile"]
    dup = shutil.which("duplicates")
    assert dup, "the duplicates tool is needed"
    proc = subprocess.run([dup, "images"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Dockerfile" not in proc.stdout, proc.stdout


def test_skaffold_yaml_is_generated_from_the_specs(tmp_path):
    result = CliRunner().invoke(main, ["render", "--format", "skaffold", "-o", "-"])
    assert result.exit_code == 0, result.output
    assert (REPO / "skaffold.yaml").read_text() == result.output, \
        "skaffold.yaml is stale: ielts-distill render --format skaffold -o skaffold.yaml"


def test_skaffold_profiles_name_every_image_the_jobs_run_and_local_loads_them():
    doc = yaml.safe_load((REPO / "skaffold.yaml").read_text())
    profiles = {p["name"]: p for p in doc["profiles"]}
    assert set(profiles) == {"local", "cloud"}
    for name, config_path in CONFIGS.items():
        artifacts = profiles[name]["build"]["artifacts"]
        built = {a["image"] for a in artifacts}
        for stage in SPECS:
            assert image(load_config(config_path), stage).rsplit(":", 1)[0] in built, (name, stage.name)
        assert profiles[name]["manifests"]["kustomize"]["paths"] == [f"k8s/overlays/{name}"]
        for a in artifacts:
            assert (REPO / a["docker"]["dockerfile"]).is_file()
            for req in a.get("requires", []):
                assert req["image"] in built and req["alias"] == "BASE_IMAGE"
    local = profiles["local"]["build"]
    assert local["local"]["push"] is False and profiles["cloud"]["build"]["local"]["push"] is True
    for a in local["artifacts"]:  # issue 15 #3: kind/minikube get every stage image, local-llm included
        assert a["hooks"]["after"][0]["command"] == ["sh", "images/load.sh"]
    teacher = next(a for a in local["artifacts"] if a["image"].endswith("/teacher"))
    base = next(a for a in local["artifacts"] if a["image"] == teacher["requires"][0]["image"])
    assert base["docker"]["buildArgs"]["EXTRAS"] == "local-llm"


def test_load_hook_loads_into_kind_or_minikube(tmp_path):
    calls = tmp_path / "calls"
    for tool in ("kind", "minikube", "kubectl"):
        script = tmp_path / tool
        reply = 'echo "${CTX}"' if tool == "kubectl" else f'echo "{tool} $*" >> {calls}'
        script.write_text(f"#!/bin/sh\n{reply}\n")
        script.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SKAFFOLD_IMAGE": "ghcr.io/x/judge:1"}
    run = lambda ctx: subprocess.run(["sh", str(REPO / "images" / "load.sh")], env={**env, "CTX": ctx},
                                     capture_output=True, text=True, timeout=30)
    assert run("kind-dev").returncode == 0 and run("minikube").returncode == 0
    assert calls.read_text().splitlines() == ["kind load docker-image ghcr.io/x/judge:1 --name dev",
                                              "minikube image load ghcr.io/x/judge:1"]
    other = run("gke_prod")
    assert other.returncode == 1 and "neither kind-* nor minikube" in other.stderr
