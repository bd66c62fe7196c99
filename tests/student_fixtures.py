"""Fixtures for the student tests (models, finetune, generate): the tiny student built once per session,
and a dataset stage's output written straight into a store from the bundled sample's real charts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.context import StageContext
from pipeline.store import open_store

SPLIT_FILE = "data/{}-00000-of-00001.parquet"


def sample_rows(sample_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (sample_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("summary")]


def sample_texts(sample_dir: Path) -> list[str]:
    rows = sample_rows(sample_dir)
    return [r["summary"] for r in rows] + [r["title"] for r in rows]


def sample_charts(sample_dir: Path, n: int, start: int = 0) -> list[tuple]:
    from PIL import Image

    rows = sample_rows(sample_dir)[start:start + n]
    return [(Image.open(sample_dir / r["image"]).convert("RGB"), r["title"]) for r in rows]


def write_dataset(store, run_id: str, sample_dir: Path, sizes=(24, 6, 8), essay_words: int = 60) -> dict:
    """The dataset stage's layout (both variants, Parquet with an Image feature, splits.json, _SUCCESS)
    from the sample's charts; essays are the sample's human summaries cut to ``essay_words`` words."""
    from datasets import Dataset, Features, Image, Value

    rows = sample_rows(sample_dir)
    features = Features({"chart_id": Value("string"), "type": Value("string"), "title": Value("string"),
                         "image": Image(), "essay": Value("string")})
    splits, start = {}, 0
    for split, n in zip(("train", "validation", "test"), sizes):
        part = rows[start:start + n]
        start += n
        for variant in ("structured", "unstructured"):
            essays = [" ".join(r["summary"].split()[:essay_words]) for r in part]
            if variant == "structured":
                essays = [f'1. <Describe a graph>:\n"{e}"' for e in essays]
            table = Dataset.from_dict({"chart_id": [r["id"] for r in part], "type": ["bar"] * len(part),
                                       "title": [r["title"] for r in part],
                                       "image": [{"bytes": (sample_dir / r["image"]).read_bytes(), "path": None}
                                                 for r in part],
                                       "essay": essays}, features=features)
            buf = io.BytesIO()
            table.to_parquet(buf)
            store.put_bytes(f"{run_id}/dataset/{variant}/{SPLIT_FILE.format(split)}", buf.getvalue())
        splits.update({r["id"]: split for r in part})
    store.put_json(f"{run_id}/dataset/splits.json", splits)
    store.put_text(f"{run_id}/dataset/_SUCCESS", json.dumps({"stage": "dataset", "summary": {}}))
    return splits


def student_config(store_uri: str, **overrides):
    """A run config for the tiny student on CPU; ``overrides`` are dotted keys (``finetune__max_steps``)."""
    sets = {"run.id": "t", "store.uri": store_uri, "student.build": "tiny", "student.device": "cpu",
            "finetune.batch_size": 4, "finetune.max_steps": 6, "finetune.eval_every": 3, "finetune.save_every": 3,
            "finetune.log_every": 1, "finetune.learning_rate": 0.01, "finetune.max_length": 512,
            "finetune.target_modules": "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
            "finetune.warmup_ratio": 0.0, "generate.max_new_tokens": 12, "generate.batch_size": 4}
    sets.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sets.items()])


def stage_ctx(config, stage: str, shard=None) -> StageContext:
    from pipeline.records import Shard

    return StageContext(config=config, store=open_store(config.store.uri), stage=stage, shard=shard or Shard())


@pytest.fixture(scope="session")
def tiny_student(sample_dir, tmp_path_factory) -> Path:
    """A tiny random student (tokenizer trained on the sample's summaries and titles), built once."""
    from pipeline.models import build_tiny_student

    return build_tiny_student(tmp_path_factory.mktemp("tiny-student"), sample_texts(sample_dir))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_student):
    from pipeline.models import load_student

    return load_student(tiny_student, device="cpu")


@pytest.fixture(scope="session")
def trained_run(sample_dir, tmp_path_factory):
    """A local store with a dataset and a finished finetune stage (both variants, a few steps each)."""
    from pipeline.stages import finetune

    store_uri = str(tmp_path_factory.mktemp("trained") / "store")
    config = student_config(store_uri, finetune__max_steps=8, finetune__eval_every=4, finetune__save_every=4)
    write_dataset(open_store(store_uri), config.run.id, sample_dir)
    finetune.run(stage_ctx(config, "finetune"))
    return config
