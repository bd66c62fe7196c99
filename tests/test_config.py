"""Config: YAML + --set overrides, one-line errors naming the key, shipped configs valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config, parse_override
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_parse_yaml_scalars(tmp_path):
    cfg = load_config(None, ["data.limit=20", "teacher.vision=false", "run.id=exp-1",
                             "finetune.target_modules=[q_proj, v_proj]", "teacher.budget_usd=2.5"])
    assert cfg.data.limit == 20 and cfg.teacher.vision is False and cfg.run.id == "exp-1"
    assert cfg.finetune.target_modules == ["q_proj", "v_proj"]
    assert cfg.teacher.budget_usd == 2.5


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {id: from-file}\ndata: {limit: 5}\n")
    cfg = load_config(path, ["data.limit=7"])
    assert (cfg.run.id, cfg.data.limit) == ("from-file", 7)


@pytest.mark.parametrize("overrides, key", [
    (["teacher.concurency=4"], "teacher.concurency: unknown key"),
    (["teacher.concurrency=abc"], "teacher.concurrency"),
    (["teacher.concurrency=0"], "teacher.concurrency"),
    (["nosuch.key=1"], "nosuch: unknown key"),
    (["run.id=Has Spaces"], "run.id"),
    (["dataset.train=0.9"], "dataset"),
    (["teacher.api_key_env=sk-live-abc123"], "teacher.api_key_env: must name an environment variable"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert key in msg and "\n" not in msg
    assert "sk-live" not in msg  # a key put where its variable's name belongs is never echoed


def test_malformed_override_and_files(tmp_path):
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


@pytest.mark.parametrize("name", ["local.yaml", "cluster.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.run.id
    assert cfg.judge_llm().base_url  # the judge inherits the teacher's endpoint


def test_judge_inherits_teacher_unless_set():
    cfg = load_config(None, ["teacher.model=big", "teacher.concurrency=3", "judge.model=small"])
    judge = cfg.judge_llm()
    assert (judge.model, judge.concurrency, judge.base_url) == ("small", 3, cfg.teacher.base_url)
    assert judge.temperature == 0.01  # the judge's own default (MiniMax refuses 0)


def test_cli_config_error_is_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "status", "--set", "teacher.concurency=4"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: teacher.concurency: unknown key"
    assert "Traceback" not in proc.stderr
