"""Shared bench helpers: the bundled sample's charts and the tiny student (model shapes: bench_student.py)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = Path(os.environ.get("IELTS_SAMPLE_DATA", REPO.parent / "shared" / "data" / "chart2text-sample"))


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / "manifest.jsonl").read_text().splitlines() if line.strip()]


def sample_charts(n: int) -> list[tuple]:
    """``n`` (PIL image, title) pairs from the bundled sample (cycled when n > 120)."""
    from PIL import Image

    rows = sample_rows()
    return [(Image.open(SAMPLE / rows[i % len(rows)]["image"]).convert("RGB"), rows[i % len(rows)]["title"])
            for i in range(n)]


def sample_texts() -> list[str]:
    rows = sample_rows()
    return [r.get("summary") or "" for r in rows] + [r["title"] for r in rows]


def tiny_student_dir() -> Path:
    from pipeline.models import build_tiny_student

    return build_tiny_student(Path(tempfile.mkdtemp(prefix="tiny-student-")), sample_texts())


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started
