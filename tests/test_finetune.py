"""The finetune stage on the tiny student: outputs, metrics, length grouping, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from student_fixtures import stage_ctx, student_config, write_dataset

from pipeline.errors import StageError
from pipeline.models import training
from pipeline.stages import finetune
from pipeline.store import open_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_finetune_writes_adapter_metrics_plot_per_variant(trained_run):

    store = open_store(trained_run.store.uri)
    done = json.loads(store.get_text("t/finetune/_SUCCESS"))["summary"]
    assert set(done) == {"structured", "unstructured"}
    for variant in ("structured", "unstructured"):
        prefix = f"t/finetune/{variant}"
        assert store.exists(f"{prefix}/adapter/adapter_config.json")
        assert store.exists(f"{prefix}/adapter/adapter_model.safetensors")
        assert store.get_bytes(f"{prefix}/loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
        rows = store.get_jsonl(f"{prefix}/metrics.jsonl")
        train = [r for r in rows if "train_loss" in r]
        val = [r for r in rows if "val_loss" in r]
        assert [r["step"] for r in train] == list(range(1, 9))
        assert [r["step"] for r in val] == [4, 8]  # every eval_every steps and at the end
        for r in train:
            assert r["tokens_per_s"] > 0 and r["samples_per_s"] > 0 and r["lr"] > 0
        assert val[-1]["val_loss"] < val[0]["val_loss"] and train[-1]["train_loss"] < train[0]["train_loss"]
        summary = done[variant]
        assert summary["steps"] == 8 and summary["padding_efficiency"] >= 0.9
        adapter_cfg = json.loads(store.get_text(f"{prefix}/adapter/adapter_config.json"))
        assert adapter_cfg["base_model_name_or_path"] == store.url("t/finetune/student")
        assert "text_model" in str(adapter_cfg["target_modules"])
        # its rows had no data column: write --adapter needs no --data (tests/test_write.py)
        assert json.loads(store.get_text(f"{prefix}/adapter/student_prompt.json")) == {"table_in_prompt": False}
    # the tiny student lives in the store, where generate finds it
    assert store.exists("t/finetune/student/model.safetensors") and store.exists("t/finetune/student/_READY")
    assert finetune.progress(stage_ctx(trained_run, "finetune")) == (2, 2)


def test_length_grouped_batches_are_deterministic_and_dense():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(150, 900) for _ in range(500)]
    plan = training.plan_batches(lengths, 6, seed=42, epoch=0)
    assert plan == training.plan_batches(lengths, 6, seed=42, epoch=0)  # resume relies on this
    assert plan != training.plan_batches(lengths, 6, seed=42, epoch=1)
    assert sorted(i for b in plan for i in b) == list(range(500))
    assert training.padding_efficiency(plan, lengths) >= 0.9
    naive = [list(range(k, min(k + 6, 500))) for k in range(0, 500, 6)]
    assert training.padding_efficiency(naive, lengths) < 0.8


def test_unknown_variant_is_one_line_error(tmp_path, sample_dir):
    config = student_config(str(tmp_path / "s"), dataset__variants="[structured]",
                            finetune__variants="[structured, unstructured]")
    write_dataset(open_store(config.store.uri), "t", sample_dir, sizes=(4, 2, 2))
    with pytest.raises(StageError, match="unstructured not built by the dataset stage"):
        finetune.run(stage_ctx(config, "finetune"))


def _run_config(tmp_path, run_id: str, **extra) -> dict:
    return {"run": {"id": run_id}, "store": {"uri": str(tmp_path / "store")},
            "student": {"build": "tiny", "device": "cpu"},
            "finetune": {"variants": ["unstructured"], "batch_size": 4, "max_steps": 40, "save_every": 2,
                         "eval_every": 100, "log_every": 1, "learning_rate": 0.003, "max_length": 512,
                         "grad_accum": 2, "lora_dropout": 0.1, **extra}}


def test_kill_9_mid_training_resumes_from_checkpoint(tmp_path, sample_dir, caplog):
    """A real process is SIGKILLed mid-run; the rerun continues from the checkpoint and ends exactly where
    an uninterrupted run ends (same data order, optimizer, scheduler and dropout RNG)."""
    store = open_store(str(tmp_path / "store"))
    for run_id in ("killed", "straight"):
        write_dataset(store, run_id, sample_dir, sizes=(24, 4, 2))
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(yaml.safe_dump(_run_config(tmp_path, "killed")))
    latest = tmp_path / "store" / "killed" / "finetune" / "unstructured" / "checkpoints" / "latest.json"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "stage", "finetune", "--config", str(cfg_file)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (latest.is_file() and json.loads(latest.read_text())["step"] >= 6):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    checkpoint = json.loads(latest.read_text())["step"]
    assert 6 <= checkpoint < 40 and not store.exists("killed/finetune/unstructured/summary.json")

    from pipeline.config import load_config

    caplog.set_level("INFO", logger="ielts_distill")
    finetune.run(stage_ctx(load_config(cfg_file), "finetune"))
    assert f"resuming from checkpoint step {checkpoint} of 40" in caplog.text
    (tmp_path / "straight.yaml").write_text(yaml.safe_dump(_run_config(tmp_path, "straight")))
    finetune.run(stage_ctx(load_config(tmp_path / "straight.yaml"), "finetune"))

    resumed = store.get_jsonl("killed/finetune/unstructured/metrics.jsonl")
    straight = store.get_jsonl("straight/finetune/unstructured/metrics.jsonl")
    steps = [r["step"] for r in resumed if "train_loss" in r]
    assert steps == list(range(1, 41))  # no step lost or repeated
    for a, b in zip(resumed, straight):
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss", "lr"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    from safetensors.torch import load

    wa = load(store.get_bytes("killed/finetune/unstructured/adapter/adapter_model.safetensors"))
    wb = load(store.get_bytes("straight/finetune/unstructured/adapter/adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-5, k


def test_early_stopping_keeps_best_weights(tmp_path, sample_dir):
    config = student_config(str(tmp_path / "s"), finetune__variants="[structured]", finetune__max_steps=40,
                            finetune__eval_every=1, finetune__early_stopping_patience=1,
                            finetune__learning_rate=0.5)  # diverges fast: validation loss must rise
    write_dataset(open_store(config.store.uri), "t", sample_dir, sizes=(8, 4, 2))
    finetune.run(stage_ctx(config, "finetune"))
    summary = open_store(config.store.uri).get_json("t/finetune/structured/summary.json")
    assert summary["stopped_early"] and summary["steps"] < 40
    assert summary["best_step"] < summary["steps"]


def test_resume_with_changed_settings_stops_naming_them(tmp_path, sample_dir):
    """A checkpoint made with other training settings is never resumed: one line names the changed keys
    and says how to start over; ``--force`` then trains from step 0 with the new settings."""
    from pipeline.executors.local import run_stage

    config = student_config(str(tmp_path / "s"), finetune__variants="[structured]", finetune__max_steps=4,
                            finetune__save_every=2, finetune__eval_every=100)
    store = open_store(config.store.uri)
    write_dataset(store, "t", sample_dir, sizes=(8, 2, 2))
    finetune.run(stage_ctx(config, "finetune"))
    assert store.get_json("t/finetune/structured/checkpoints/latest.json")["step"] == 2
    r16 = store.get_json("t/finetune/structured/summary.json")["trainable_parameters"]
    for key in ("t/finetune/_SUCCESS", "t/finetune/structured/summary.json"):  # as if killed after step 2
        store.delete(key)
    changed = student_config(str(tmp_path / "s"), finetune__variants="[structured]", finetune__max_steps=4,
                             finetune__save_every=2, finetune__eval_every=100, finetune__learning_rate=0.002,
                             finetune__lora_r=4, finetune__log_every=2)  # log_every alone would not matter
    with pytest.raises(StageError) as err:
        finetune.run(stage_ctx(changed, "finetune"))
    message = str(err.value)
    assert "\n" not in message and "checkpoint at step 2" in message and "--force" in message
    assert "finetune.learning_rate 0.01 -> 0.002" in message and "finetune.lora_r 16 -> 4" in message
    assert "log_every" not in message
    assert run_stage(changed, store, "finetune", force=True)
    summary = store.get_json("t/finetune/structured/summary.json")
    assert summary["steps"] == 4 and summary["trainable_parameters"] * 4 == r16  # r=4, trained from scratch


@pytest.mark.slow
def test_two_processes_match_the_one_process_loss_curve(tmp_path, sample_dir, capfd):
    """``finetune.gpus: 2`` trains with two data-parallel processes (torchrun, gloo on CPU), each on its half
    of every batch: same global batch, same loss curve and weights as one process. The processes are started
    by the executor through the stage spec's launcher; the stage only trains as the rank it is.
    Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 40 s (timeout 600)."""
    from pipeline.executors.local import run_stage

    assert "subprocess" not in Path(finetune.__file__).read_text()  # the stage starts no process itself
    store = open_store(str(tmp_path / "store"))
    curves, weights = {}, {}
    for run_id, gpus in (("one", 1), ("two", 2)):
        write_dataset(store, run_id, sample_dir, sizes=(16, 4, 2))
        config = student_config(str(tmp_path / "store"), run__id=run_id, finetune__variants="[unstructured]",
                                finetune__max_steps=6, finetune__eval_every=3, finetune__save_every=100,
                                finetune__lora_dropout=0.0, finetune__gpus=gpus)
        assert run_stage(config, store, "finetune")
        assert ("over 2 processes" in capfd.readouterr().err) == (gpus == 2)  # the launcher's two ranks trained
        rows = store.get_jsonl(f"{run_id}/finetune/unstructured/metrics.jsonl")
        curves[gpus] = [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in rows]
        from safetensors.torch import load

        weights[gpus] = load(store.get_bytes(f"{run_id}/finetune/unstructured/adapter/adapter_model.safetensors"))
    assert [c[0] for c in curves[2]] == [c[0] for c in curves[1]]
    for (_, t1, v1), (_, t2, v2) in zip(curves[1], curves[2]):
        assert (t1 is None) == (t2 is None) and (v1 is None) == (v2 is None)
        assert t1 is None or t2 == pytest.approx(t1, rel=1e-4)
        assert v1 is None or v2 == pytest.approx(v1, rel=1e-4)
    train = [t for _, t, _ in curves[1] if t is not None]
    assert len(train) == 6 and train[-1] < train[0]  # it did learn
    for k in weights[1]:
        assert (weights[1][k] - weights[2][k]).abs().max() < 1e-4, k


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_then_resumes(tmp_path, sample_dir):
    """A preempted pod gets SIGTERM: the stage checkpoints the step it is at and stops (no save_every wait);
    the rerun resumes there and ends with every step done once.
    Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 35 s (timeout 600)."""
    store = open_store(str(tmp_path / "store"))
    write_dataset(store, "term", sample_dir, sizes=(24, 4, 2))
    cfg_file = tmp_path / "term.yaml"
    cfg_file.write_text(yaml.safe_dump(_run_config(tmp_path, "term", save_every=1000)))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "stage", "finetune", "--config", str(cfg_file)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = 0
    try:
        for line in proc.stderr:  # the Trainer-style loss lines: one per step (log_every 1)
            seen += line.lstrip().startswith("{'loss'") or " {'loss'" in line
            if seen >= 3:
                proc.send_signal(signal.SIGTERM)
                break
        err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "stopped by SIGTERM at step" in err, err[-2000:]
    step = store.get_json("term/finetune/unstructured/checkpoints/latest.json")["step"]
    assert 3 <= step < 40 and not store.exists("term/finetune/unstructured/summary.json")
    from pipeline.config import load_config

    finetune.run(stage_ctx(load_config(cfg_file), "finetune"))
    rows = store.get_jsonl("term/finetune/unstructured/metrics.jsonl")
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 41))
