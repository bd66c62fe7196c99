"""The ielts-distill command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


def test_help_lists_commands():
    out = cli("--help").stdout
    for command in ("run", "stage", "status", "config"):
        assert f"  {command} " in out
    for command in ("run", "stage", "status"):
        sub = cli(command, "--help")
        assert sub.returncode == 0 and "--config" in sub.stdout and "--set" in sub.stdout


def test_run_only_ingest_then_status_and_skip(sample_dir, tmp_path):
    sets = ["--set", f"store.uri={tmp_path}", "--set", f"data.source={sample_dir}", "--set", "data.limit=8",
            "--set", "run.id=cli-test"]
    first = cli("run", "--only", "ingest", *sets)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "cli-test" / "ingest" / "_SUCCESS").is_file()
    assert "teacher" not in {p.name for p in (tmp_path / "cli-test").iterdir()}
    stored = (tmp_path / "cli-test" / "config.yaml").read_text()
    assert "limit: 8" in stored

    again = cli("run", "--only", "ingest", *sets)
    assert again.returncode == 0 and "already complete" in again.stderr

    status = json.loads(cli("status", "--json", *sets).stdout)
    states = {row["stage"]: row["state"] for row in status}
    assert states["ingest"] == "done" and states["teacher"] == "not started"
    assert status[0]["summary"]["read"] == 8


def test_stage_needs_its_inputs(tmp_path):
    proc = cli("stage", "dataset", "--set", f"store.uri={tmp_path}")
    assert proc.returncode == 2  # deterministic: the Job's podFailurePolicy fails it at once, no retries
    assert proc.stderr.strip().splitlines()[-1].startswith("error: stage 'dataset' needs stage")
    assert "Traceback" not in proc.stderr


def test_bad_shard_is_one_line(tmp_path):
    proc = cli("stage", "ingest", "--shard", "4/4", "--set", f"store.uri={tmp_path}")
    assert proc.returncode == 1 and proc.stderr.strip().endswith("index must be in 0..count-1")
