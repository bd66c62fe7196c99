"""The rendered Kubernetes objects are equivalent to the saved render of the code before the StageSpec
refactor (tests/fixtures/k8s_render/; its README lists the intended changes applied since)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import dump_config, load_config
from pipeline.k8s.objects import build_run, to_dict

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "k8s_render"
CONFIGS = {"cloud": REPO / "configs" / "cluster.yaml", "local": REPO / "k8s" / "overlays" / "local" / "run.yaml"}


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
        assert job_now == job_saved, job_now["metadata"]["name"]
