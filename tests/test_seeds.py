"""finetune.seeds: each variant trained once per seed (separate adapters), generate and judge per seed, the
report per seed and pooled with a bootstrap interval over charts and seeds."""

from __future__ import annotations

from eval_helpers import seed_run
from fake_llm import FakeLLM
from test_judge import TITLE_KEY, fair, fast_backoff  # noqa: F401 -- fast_backoff: autouse fixture

from pipeline.config import load_config
from pipeline.context import StageContext, store_for
from pipeline.executors.local import run_stage
from pipeline.stages import finetune, generate, spec


def test_units_shards_and_comparisons_per_seed():
    config = load_config(None, ["finetune.seeds=[7, 8]"])
    assert config.finetune.units() == [("structured-seed7", "structured", 7), ("structured-seed8", "structured", 8),
                                       ("unstructured-seed7", "unstructured", 7),
                                       ("unstructured-seed8", "unstructured", 8)]
    assert config.finetune.unit_of("unstructured-seed8") == ("unstructured", 8)
    assert config.finetune.unit_of("baseline") == ("baseline", None)
    assert config.judged_comparisons()[:3] == [("structured-seed7", "baseline", 7), ("structured-seed8", "baseline", 8),
                                               ("unstructured-seed7", "baseline", 7)]
    assert ("unstructured-seed8", "structured-seed8", 8) in config.judged_comparisons()  # same seed on both sides
    assert spec("finetune").shard_count(config) == 4  # one pod per variant and seed
    ctx = StageContext(config, store_for(config), "finetune")
    assert finetune.adapter_names(ctx) == [n for n, _, _ in config.finetune.units()]
    assert generate.model_names(StageContext(config, store_for(config), "generate"))[1:] == finetune.adapter_names(ctx)
    one = load_config(None, ["finetune.seeds=[5]"])
    assert one.finetune.units()[0] == ("structured", "structured", 5)  # one seed: the variant's own name
    assert one.judged_comparisons()[0] == ("structured", "baseline", None)


def test_report_per_seed_and_pooled(tmp_path, sample_dir):
    with FakeLLM(reply=fair, key_pattern=TITLE_KEY) as llm:
        config = seed_run(str(tmp_path / "store"), sample_dir, tmp_path, overrides=(
            f"judge.base_url={llm.base_url}", "judge.model=fake-judge", "judge.timeout_s=2", "judge.max_retries=1",
            "judge.selftest_charts=0", "judge.as_written=false", "judge.comparisons=[[structured, baseline]]",
            "finetune.seeds=[1, 2]", "finetune.variants=[structured]"))
        store = store_for(config)
        key = f"{config.run.id}/generate/essays.jsonl"
        rows = store.get_jsonl(key)
        base = {r["chart_id"]: r for r in rows if r["model"] == "baseline"}
        # seed 1 learned the essays, seed 2 did not (it writes the title, like the baseline)
        seeded = [{**r, "model": "structured-seed1"} for r in rows if r["model"] == "structured"] + \
                 [{**base[r["chart_id"]], "model": "structured-seed2"} for r in rows if r["model"] == "structured"]
        store.put_jsonl(key, list(base.values()) + seeded)
        assert run_stage(config, store, "judge") and run_stage(config, store, "report")
    summary = store.get_json(f"{config.run.id}/report/summary.json")
    assert summary["seeds"] == [1, 2]
    (c,) = summary["comparisons"]
    assert (c["a"], c["b"], c["seeds"], c["ci95_method"]) == ("structured", "baseline", 2,
                                                               "bootstrap over charts and seeds")
    assert [(s["seed"], s["a"], s["win_rate"]) for s in c["per_seed"]] == [(1, "structured-seed1", 1.0),
                                                                            (2, "structured-seed2", 0.5)]
    assert c["n"] == 14 and c["win_rate"] == 0.75
    assert c["ci95"][0] <= 0.55 and c["ci95"][1] == 1.0 and c["ci_includes_half"]  # the seeds disagree
    assert set(c["lengths"]) == {"structured", "baseline"} and c["lengths"]["structured"]["n"] == 14
    md = store.get_text(f"{config.run.id}/report/report.md")
    assert "Training seeds: 1, 2 (`finetune.seeds`): each variant trained once per seed" in md
    assert "**structured vs baseline** (layout-neutral, 2 seeds pooled, bootstrap over charts and seeds)" in md
    assert "| &nbsp;&nbsp;seed 2 | 7 | 0 / 0 / 7 / 0 | 50.0 % |" in md
