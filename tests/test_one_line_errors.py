"""Operator mistakes end in one line naming the value, never a traceback (the real CLI, in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_llm import FakeLLM

CLI = str(Path(sys.executable).parent / "ielts-distill")


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "MINIMAX_API_KEY": "sk-onelinetest-123456", **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    import re

    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr


@pytest.mark.slow
def test_config_mistakes(tmp_path):
    """Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 1 s (timeout 600)."""
    binary = tmp_path / "run.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    one_line_error(cli("config", "-c", str(binary)), r"run.yaml is not UTF-8 text")
    one_line_error(cli("config", "--set", "teacher.timeout_s=.inf"), r"teacher.timeout_s: .*finite number")
    one_line_error(cli("config", "--set", "finetune.learning_rate=.nan"), r"finetune.learning_rate: .*finite")
    one_line_error(cli("config", "--set", "store.outage_s=-1"), r"store.outage_s")


@pytest.mark.slow
def test_runtime_mistakes(tmp_path, sample_dir):
    """Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 3 s (timeout 600)."""
    store = f"store.uri={tmp_path / 's'}"
    one_line_error(cli("stage", "ingest", "--set", store, env={"JOB_COMPLETION_INDEX": "x", "JOB_COMPLETION_COUNT": "2"}),
                   r"JOB_COMPLETION_INDEX='x'.*whole numbers")
    one_line_error(cli("stage", "ingest", "--set", "store.uri=s3://Bad_Bucket/x"),
                   r"'Bad_Bucket' is not a valid S3 bucket name")
    with FakeLLM() as llm:
        base = ["--set", store, "--set", f"data.source={sample_dir}", "--set", "data.limit=20",
                "--set", f"teacher.base_url={llm.base_url}"]
        assert cli("stage", "ingest", *base).returncode == 0
        proc = cli("stage", "teacher", *base, "--set", "teacher.templates=v9")
        # the template is missing for every chart: one line, no request sent, no per-chart ERROR lines
        one_line_error(proc, r"prompt template not found: pipeline/prompts/teacher/v9/")
        assert proc.stderr.count("ERROR") == 0 and llm.total == 0
