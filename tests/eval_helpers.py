"""A run ready for the judge: real ingest of a few sample charts, then teacher, dataset and generate
artifacts written in their documented store layout (no model needed), for the judge and report tests."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import RunConfig, load_config
from pipeline.context import StageContext
from pipeline.executors.local import run_stage
from pipeline.store import ArtifactStore

MODELS = ("baseline", "structured", "unstructured")


def pick_charts(sample_dir: Path, n: int = 8) -> list[dict]:
    """n sample charts: as many chart types and sources as possible, in a stable order."""
    rows = [json.loads(line) for line in (sample_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["chart_type_ielts"] in ("bar", "line", "pie", "table")]
    rows.sort(key=lambda r: (r["source"] != "statista", r["id"]))
    picked, seen = [], set()
    for r in rows:  # one of each (type, source) first, then fill up
        if (r["chart_type_ielts"], r["source"]) not in seen:
            seen.add((r["chart_type_ielts"], r["source"]))
            picked.append(r)
    picked += [r for r in rows if r not in picked][: max(0, n - len(picked))]
    return picked[:n]


def make_source(sample_dir: Path, tmp: Path, n: int = 8) -> Path:
    src = tmp / "source"
    src.mkdir(parents=True, exist_ok=True)
    rows = pick_charts(sample_dir, n)
    for sub in ("images", "data"):  # ingest reads only paths inside data.source: link the sample's folders
        if not (src / sub).exists():
            (src / sub).symlink_to(sample_dir / sub, target_is_directory=True)
    (src / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


def golden_essay(chart: dict) -> str:
    nums = [c for row in (chart.get("table") or [])[1:] for c in row[1:]][:3]
    facts = ", ".join(nums) if nums else "several values"
    return (f'1. <Describe a graph>:\n"The chart illustrates {chart["title"].lower()}."\n\n'
            f'2. <Find the key points, trends and compare data>:\n\nParagraph 1:\n"The figures were {facts}, '
            'which shows a clear pattern across the categories over the period shown."\n\n'
            'Paragraph 2:\n"The largest category was well ahead of the others, while the smallest remained modest."\n\n'
            '3. <Write a summary of presented data>:\n"Overall, the data reveals a clear contrast between the groups."')


def model_essay(model: str, chart: dict) -> str:
    golden = golden_essay(chart)
    if model == "baseline":
        return chart["title"]  # the seed's "too short" failure
    if model == "structured":
        return golden
    from pipeline.essays import unstructure

    return unstructure(golden) + "\n\nThe data also shows 12345 of something invented."


def finish(model: str, index: int) -> dict:
    """generate's ``finish``: the unstructured model's 2nd essay hit the token limit; the baseline's records
    predate the field (unknown)."""
    if model == "baseline":
        return {}
    return {"finish": "length" if model == "unstructured" and index == 1 else "stop"}


def seed_run(store_uri: str, sample_dir: Path, tmp: Path, *, n: int = 8, overrides: tuple[str, ...] = ()) -> RunConfig:
    """Ingest n charts for real; write teacher/dataset/generate outputs; return the run config."""
    config = load_config(None, [f"store.uri={store_uri}", f"data.source={make_source(sample_dir, tmp, n)}",
                                "teacher.min_words=20", "teacher.max_words=190", *overrides])
    from pipeline.context import store_for

    store = store_for(config)
    run_stage(config, store, "ingest")
    charts = store.get_jsonl(f"{config.run.id}/ingest/charts.jsonl")
    teacher = StageContext(config, store, "teacher")
    store.put_jsonl(teacher.key("essays.jsonl"),
                    [{"chart_id": c["id"], "type": c["type"], "status": "accepted", "essay": golden_essay(c)}
                     for c in charts])
    teacher.complete({"accepted": len(charts)})
    dataset = StageContext(config, store, "dataset")
    # every chart in test but the first (which lands in train)
    store.put_json(dataset.key("splits.json"), {c["id"]: "train" if i == 0 else "test" for i, c in enumerate(charts)})
    dataset.complete({})
    generate = StageContext(config, store, "generate")
    store.put_jsonl(generate.key("essays.jsonl"),
                    [{"model": m, "chart_id": c["id"], "essay": model_essay(m, c), "tokens": 10, "seconds": 0.1,
                      **finish(m, i)} for m in MODELS for i, c in enumerate(charts)])
    generate.complete({})
    return config


def split_charts(store: ArtifactStore, config: RunConfig) -> list[dict]:
    splits = store.get_json(f"{config.run.id}/dataset/splits.json")
    return [c for c in store.get_jsonl(f"{config.run.id}/ingest/charts.jsonl") if splits[c["id"]] == "test"]
