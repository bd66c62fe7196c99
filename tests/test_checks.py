"""`config --check` and the reasoning-model token rule, on the shipped configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.checks import check_config, tokens_needed
from pipeline.config import is_reasoning, load_config, token_limit

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "ielts-distill"
SHIPPED = ["configs/cluster.yaml", "configs/local.yaml", "k8s/overlays/local/run.yaml"]


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_config_passes_the_check(path):
    assert check_config(load_config(REPO / path)) == []


def test_cluster_judge_gets_room_to_think():
    config = load_config(REPO / "configs/cluster.yaml")
    judge = config.judge_llm()
    assert judge.model == "MiniMax-M2.7" and is_reasoning(judge)
    assert token_limit(judge) >= judge.max_tokens + 1024
    assert not is_reasoning(load_config(REPO / "configs/local.yaml").judge_llm())  # SmolLM2 answers at once


@pytest.mark.parametrize("model, expected", [("MiniMax-M1", True), ("MiniMax-M2.7", True), ("deepseek-reasoner", True), ("o3-mini", True),
                                             ("gpt-4o-mini", False), ("MiniMax-Text-01", False),
                                             ("smollm2-135m-instruct", False)])
def test_reasoning_models_are_known_by_name(model, expected):
    assert is_reasoning(load_config(None, [f"teacher.model={model}"]).teacher) is expected


def test_reasoning_flag_overrides_the_name():
    config = load_config(None, ["teacher.model=my-own-thinker", "teacher.reasoning=true", "teacher.max_tokens=100",
                                "teacher.reasoning_tokens=2000"])
    assert token_limit(config.teacher) == 2100


@pytest.mark.parametrize("override, key", [
    ("judge.reasoning_tokens=100", "judge.reasoning_tokens=100"),
    ("generate.max_new_tokens=320", "generate.max_new_tokens=320"),
    ("teacher.embedded=true", "teacher.embedded=true"),
])
def test_dangerous_combinations_are_named(override, key):
    findings = check_config(load_config(REPO / "configs/cluster.yaml", [override]))
    assert findings and all("\n" not in f for f in findings)
    assert any(f.startswith(key) for f in findings), findings


def test_max_new_tokens_rule_matches_the_word_limit():
    assert tokens_needed(190, "structured") > 400 > tokens_needed(190, "unstructured") - 100
    config = load_config(REPO / "configs/cluster.yaml")
    assert config.generate.max_new_tokens >= max(tokens_needed(config.teacher.max_words, v)
                                                 for v in config.finetune.variants)


def test_cli_check_exits_1_with_one_line_per_finding():
    out = subprocess.run([str(CLI), "config", "--check", "-c", str(REPO / "configs/cluster.yaml"),
                          "--set", "generate.max_new_tokens=320"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines and all(line.startswith("warning: generate.max_new_tokens=320") for line in lines)
    ok = subprocess.run([str(CLI), "config", "--check", "-c", str(REPO / "configs/cluster.yaml")],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
