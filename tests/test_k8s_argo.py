"""``ielts-distill render --format argo``: an Argo Workflows Workflow valid against Argo's own CRD schema
(tests/fixtures/argo/, from argoproj/argo-workflows), whose DAG is the StageSpecs' and whose pods are the
Jobs' pods."""

from __future__ import annotations

import copy
import gzip
import json
from graphlib import TopologicalSorter
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.k8s.objects import build_job, to_dict
from pipeline.stages import SPECS, STAGES

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads(gzip.decompress((REPO / "tests/fixtures/argo/workflow-v1alpha1.schema.json.gz").read_bytes()))
CONFIGS = {"cloud": REPO / "configs" / "cluster.yaml", "local": REPO / "k8s" / "overlays" / "local" / "run.yaml"}
FAKE_KEY = "sk-FAKE-argo-key-51c0"


def _render(config_path: Path, tmp_path: Path) -> list[dict]:
    out = tmp_path / "argo.yaml"
    result = CliRunner().invoke(main, ["render", "--format", "argo", "-c", str(config_path), "-o", str(out)],
                                env={"MINIMAX_API_KEY": FAKE_KEY})
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert FAKE_KEY not in text
    return list(yaml.safe_load_all(text))


def _unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not declare (the API server would drop them): kubectl's --strict check."""
    if isinstance(obj, list) and "items" in schema:
        return [u for i, item in enumerate(obj) for u in _unknown_fields(item, schema["items"], f"{path}[{i}]")]
    if not isinstance(obj, dict) or "properties" not in schema or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    props = schema["properties"]
    return [u for key, value in obj.items()
            for u in ([f"{path}.{key}"] if key not in props else _unknown_fields(value, props[key], f"{path}.{key}"))]


def _validate(workflow: dict) -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(workflow)
    unknown = _unknown_fields(workflow, SCHEMA)
    if unknown:
        raise jsonschema.ValidationError(f"unknown fields: {unknown}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_workflow_is_schema_valid_and_its_dag_is_the_stage_order(name, tmp_path):
    config = load_config(CONFIGS[name])
    configmap, wf = _render(CONFIGS[name], tmp_path)
    assert configmap["kind"] == "ConfigMap" and wf["kind"] == "Workflow"
    _validate(wf)
    templates = {t["name"]: t for t in wf["spec"]["templates"]}
    tasks = templates[wf["spec"]["entrypoint"]]["dag"]["tasks"]
    graph = {t["name"]: set(t.get("dependencies", [])) for t in tasks}
    assert graph == {s.name: set(s.inputs) for s in SPECS}
    assert list(TopologicalSorter(graph).static_order()) == list(STAGES)
    for s in SPECS:
        task = next(t for t in tasks if t["name"] == s.name)
        shards = s.shard_count(config)
        assert task.get("withSequence", {}).get("count") == (str(shards) if shards is not None else None)
        job = to_dict(build_job(config, s.name))["spec"]["template"]["spec"]
        template = templates[s.name]
        container = template["container"]
        env = container.pop("env")
        assert container == {k: v for k, v in job["containers"][0].items() if k != "env"}  # the Job's container
        assert env[: len(job["containers"][0]["env"])] == job["containers"][0]["env"]
        if shards is not None:
            assert env[-1] == {"name": "JOB_COMPLETION_INDEX", "value": "{{inputs.parameters.index}}"}
        assert template["volumes"] == job["volumes"] and template["securityContext"] == job["securityContext"]
        assert template["retryStrategy"] == {"limit": str(config.k8s.backoff_limit), "retryPolicy": "Always",
                                             "expression": "asInt(lastRetry.exitCode) != 2"}


def test_the_schema_check_can_fail(tmp_path):
    _, wf = _render(CONFIGS["local"], tmp_path)
    broken = copy.deepcopy(wf)
    broken["spec"]["templates"][0]["dag"]["tasks"][1]["withSequence"] = 2  # an object in Argo's schema
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)
    wf["spec"]["templates"][1]["container"]["imagePullPolicyy"] = "Always"  # a typo the server would drop
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolicyy"):
        _validate(wf)


def test_queue_name_and_pull_secrets_reach_the_workflow(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIGS["local"].read_text() + "  queue_name: team-a\n  image_pull_secrets: [regcred]\n")
    _, wf = _render(path, tmp_path)
    _validate(wf)
    assert wf["spec"]["podMetadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "team-a"}  # Kueue's pod integration
    assert "kueue.x-k8s.io/queue-name" not in wf["metadata"]["labels"]  # (Kueue ignores a Workflow's labels)
    from pipeline.k8s.objects import build_job  # the driver's Jobs with a queue name: created suspended

    queued = [build_job(load_config(path), s).spec.suspend for s in ("ingest", "finetune")]
    assert queued == [True, True] and build_job(load_config(CONFIGS["local"]), "ingest").spec.suspend is None
    assert wf["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
