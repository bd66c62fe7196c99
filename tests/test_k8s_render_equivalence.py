"""The rendered Kubernetes objects are equivalent to the saved render of the code before the StageSpec
refactor (tests/fixtures/k8s_render/), once the changes made on purpose since (``_intended``, issue 15) are
applied to the saved Jobs: nothing else may differ."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import dump_config, load_config
from pipeline.k8s.objects import build_run, to_dict
from pipeline.stages import spec

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "k8s_render"
CONFIGS = {"cloud": REPO / "configs" / "cluster.yaml", "local": REPO / "k8s" / "overlays" / "local" / "run.yaml"}


CPU_OFF_GPU_NODES = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "NotIn", "values": ["true"]}]}]}}}


def _intended(config, job: dict) -> dict:
    """The saved Job with every intended change since the fixture was taken."""
    stage = job["metadata"]["labels"]["ielts-distill/stage"]
    js = job["spec"]
    pod = js["template"]["spec"]
    container = pod["containers"][0]
    js["podReplacementPolicy"] = "Failed"  # #9: a replacement pod starts only once the old one is gone
    if js.get("completionMode") == "Indexed":  # #9: each shard retries on its own
        js["backoffLimitPerIndex"] = js.pop("backoffLimit")
        js["maxFailedIndexes"] = js["completions"]
    if config.k8s.profile == "cloud" and "nodeSelector" not in pod:  # #6: CPU stages keep off GPU nodes
        pod["affinity"] = CPU_OFF_GPU_NODES
    for mount in container["volumeMounts"]:  # #1: the data volume's root at k8s.data_mount, as the loader sees it
        if mount["name"] == "data":
            mount["mountPath"] = config.k8s.data_mount
    if config.k8s.profile == "cpu":  # #4: kind-sized requests, CPU limit k8s.cpu_limit
        container["resources"]["requests"] = dict(spec(stage).resources["cpu"])
        container["resources"]["limits"] = {**spec(stage).resources["cpu"], "cpu": config.k8s.cpu_limit}
    for env in container["env"]:  # #9: the local store is Service s3 (SeaweedFS, or MinIO), not minio
        if env["name"] == "AWS_ENDPOINT_URL_S3":
            env["value"] = config.k8s.s3_endpoint
    shards = spec(stage).shard_count(config)
    if js.get("completionMode") == "Indexed" and shards != js["completions"]:  # issue 25: a pod per variant and seed
        js["completions"] = js["parallelism"] = js["maxFailedIndexes"] = shards
        for env in container["env"]:
            if env["name"] == "JOB_COMPLETION_COUNT":
                env["value"] = str(shards)
    if config.k8s.model_cache_claim:  # #7: the Hub cache on a PVC
        pod["volumes"].append({"name": "models", "persistentVolumeClaim": {"claimName": config.k8s.model_cache_claim}})
        container["volumeMounts"].append({"mountPath": "/var/cache/ielts-distill/huggingface", "name": "models"})
    return job


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_render_matches_the_saved_objects(name):
    config = load_config(CONFIGS[name])
    now = [to_dict(o) for o in build_run(config)]
    saved = [d for d in yaml.safe_load_all((FIXTURES / f"{name}.yaml").read_text()) if d]
    assert [(o["kind"], o["metadata"]["name"]) for o in now] == [(o["kind"], o["metadata"]["name"]) for o in saved]
    cm_now, cm_saved = now[0], saved[0]
    assert cm_now["metadata"] == cm_saved["metadata"]
    assert cm_now["data"] == {"config.yaml": dump_config(config)}
    for job_now, job_saved in zip(now[1:], saved[1:]):
        assert job_now == _intended(config, job_saved), job_now["metadata"]["name"]
