"""A small LoRA trainer for the student: samples, batch plan, step, evaluation, checkpoint and resume.

A plain PyTorch loop (simpler to keep resume exact than Trainer's): length-grouped batches (padding
efficiency logged), gradient accumulation with token-weighted loss, AdamW, cosine/linear/constant
schedule with warm-up, gradient clipping, optional gradient checkpointing, validation every
``eval_every`` steps and at the end, optional early stopping (the best weights are kept).

Checkpoints (``Checkpoints``: ``step-<N>/`` = adapter + ``state.pt`` with optimizer, scheduler, RNG and
metrics, then ``latest.json``) live under a store prefix the caller chooses. A killed run resumes from the
latest one: same weights, optimizer and scheduler state, RNG and data order (the batch plan is a pure
function of the seed and epoch), so it continues exactly where an uninterrupted run would be.
The finetune stage owns what is trained and where the results go; this module owns how.
"""

from __future__ import annotations

import io
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import StageError

MEGABATCH = 50  # length grouping: sort within windows of MEGABATCH batches, then shuffle the batches


# --------------------------------------------------------------------------- samples and batches


class Samples:
    """A split encoded for training. Encodings are kept in memory up to ``keep_bytes`` of pixels (the
    demo, the validation set); beyond that images are re-encoded when their batch comes."""

    def __init__(self, rows, processor, max_length: int, keep_bytes: int = 2 << 30):
        from pipeline.models.chat import encode

        self.rows, self.processor, self.max_length = rows, processor, max_length
        self.lengths: list[int] = []
        self.cache: dict[int, Any] = {}
        kept = 0
        for i, row in enumerate(rows):
            try:
                enc = encode(processor, row["image"], row["title"], row["essay"], max_length)
            except ValueError as exc:
                raise StageError(f"chart {row['chart_id']}: {exc}") from None
            self.lengths.append(len(enc))
            size = enc.pixel_values.numel() * enc.pixel_values.element_size()
            if kept + size <= keep_bytes:
                self.cache[i], kept = enc, kept + size

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int):
        from pipeline.models.chat import encode

        if i in self.cache:
            return self.cache[i]
        row = self.rows[i]
        return encode(self.processor, row["image"], row["title"], row["essay"], self.max_length)


def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-grouped batches for one epoch: shuffle, sort by length inside windows of MEGABATCH batches,
    cut into batches, shuffle the batches. A pure function of (lengths, batch_size, seed, epoch)."""
    rng = random.Random(f"{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * MEGABATCH
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def padding_efficiency(batches: list[list[int]], lengths: list[int]) -> float:
    """Real tokens / padded tokens over the batches."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return real / padded if padded else 1.0


# --------------------------------------------------------------------------- training state and checkpoints


@dataclass
class TrainState:
    step: int = 0
    best_val: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    best_lora: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# finetune.* settings that do not change what is trained: a resumed run may change them
RESUME_NEUTRAL = {"variants", "save_every", "log_every", "gpus", "gradient_checkpointing"}


def config_fingerprint(cfg) -> dict[str, Any]:
    """The ``finetune.*`` part of a checkpoint's fingerprint (the caller adds the data and the base model)."""
    return {f"finetune.{k}": v for k, v in cfg.model_dump(mode="json").items() if k not in RESUME_NEUTRAL}


def fingerprint_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """``key old -> new`` for every key whose value differs (a checkpoint without a fingerprint: all)."""
    import json

    saved = json.loads(json.dumps(saved or {}))  # tuples and lists compare alike
    current = json.loads(json.dumps(current))
    return [f"{k} {saved.get(k, '(unset)')} -> {current.get(k, '(unset)')}" for k in sorted(saved.keys() | current.keys())
            if saved.get(k) != current.get(k)]


class Checkpoints:
    """``<prefix>/step-<N>/`` in ``store``; ``<prefix>/latest.json`` names the newest complete one and holds
    the run's ``fingerprint`` (training settings, data, base model): resuming with another one is refused."""

    def __init__(self, store, prefix: str, fingerprint: dict[str, Any] | None = None):
        self.store, self.prefix, self.fingerprint = store, prefix, fingerprint or {}

    def _latest(self) -> dict[str, Any] | None:
        key = f"{self.prefix}/latest.json"
        return self.store.get_json(key) if self.store.exists(key) else None

    def latest(self) -> int | None:
        latest = self._latest()
        return latest["step"] if latest else None

    def save(self, model, optimizer, scheduler, state: TrainState, tmp: Path) -> None:
        import torch
        from peft import get_peft_model_state_dict

        folder = tmp / f"step-{state.step}"
        model.save_pretrained(folder / "adapter")
        buf = io.BytesIO()
        torch.save({"state": state.__dict__, "lora": get_peft_model_state_dict(model),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state()}, buf)
        (folder / "state.pt").write_bytes(buf.getvalue())
        previous = self.latest()
        self.store.upload_dir(folder, f"{self.prefix}/step-{state.step}")
        self.store.put_json(f"{self.prefix}/latest.json", {"step": state.step, "fingerprint": self.fingerprint})
        if previous is not None and previous != state.step:  # keep only the newest
            self.store.delete_prefix(f"{self.prefix}/step-{previous}/")

    def load(self, model, optimizer, scheduler, name: str) -> TrainState:
        """Restore the latest checkpoint; a StageError naming the changed settings when its fingerprint
        differs (never a run that mixes two configurations)."""
        import torch
        from peft import set_peft_model_state_dict

        latest = self._latest()
        step = latest["step"]
        changes = fingerprint_changes(latest.get("fingerprint"), self.fingerprint)
        if changes:
            raise StageError(f"finetune {name}: the checkpoint at step {step} ({self.store.url(self.prefix)}) was "
                             f"made with other settings: {'; '.join(changes)}; rerun with --force to start over")
        blob = torch.load(io.BytesIO(self.store.get_bytes(f"{self.prefix}/step-{step}/state.pt")),
                          map_location="cpu", weights_only=False)
        set_peft_model_state_dict(model, blob["lora"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        _set_rng_state(blob["rng"])
        return TrainState(**blob["state"])


# --------------------------------------------------------------------------- step and evaluation


def _batch_loss(model, batch: dict[str, Any]):
    """(mean loss over the batch's answer tokens, number of those tokens)."""
    out = model(**batch, use_cache=False)
    return out.loss, int((batch["labels"][:, 1:] != -100).sum())


def _to_device(batch: dict[str, Any], device, dtype) -> dict[str, Any]:
    out = {k: v.to(device) for k, v in batch.items()}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def evaluate(model, samples: Samples, batch_size: int, pad_id: int, device, dtype) -> float:
    import torch

    from pipeline.models.chat import collate

    model.eval()
    order = sorted(range(len(samples)), key=lambda i: samples.lengths[i])
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = collate([samples[i] for i in order[start:start + batch_size]], pad_id)
            loss, n = _batch_loss(model, _to_device(batch, device, dtype))
            total, tokens = total + float(loss) * n, tokens + n
    model.train()
    return total / max(tokens, 1)


def plot_losses(metrics: list[dict[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    train = [(m["step"], m["train_loss"]) for m in metrics if "train_loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    if train:
        ax.plot(*zip(*train), label="training loss", color="#1f77b4")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="#d62728")
    ax.set(xlabel="optimizer step", ylabel="loss (answer tokens)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(values: dict[str, Any]) -> str:
    """Trainer-style log line: {'loss': 2.3104, 'learning_rate': 0.0002, 'epoch': 0.5}."""
    return "{" + ", ".join(f"'{k}': {round(v, 4) if isinstance(v, float) else v}" for k, v in values.items()) + "}"


# --------------------------------------------------------------------------- the loop


def prepare_model(base: str, student, cfg):
    """(LoRA-wrapped student in training mode, processor) from ``student.*`` and ``finetune.*`` settings."""
    import torch

    from pipeline.models.loading import add_lora, load_student

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, processor = load_student(base, device=student.device, attn_implementation=student.attn_implementation,
                                    bf16=cfg.bf16, image_longest_edge=student.image_longest_edge)
    model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     target_modules=cfg.target_modules)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, processor


@dataclass
class TrainResult:
    state: TrainState
    planned_steps: int
    train_samples: int
    validation_samples: int
    padding_efficiency: float
    trainable_parameters: int
    stopped_early: bool

    def summary(self) -> dict[str, Any]:
        """The numbers of a finished run (the stage adds what it knows: variant, base model)."""
        metrics = self.state.metrics
        train_rows = [m for m in metrics if "train_loss" in m]
        val_rows = [m for m in metrics if "val_loss" in m]
        return {"steps": self.state.step, "planned_steps": self.planned_steps, "train_samples": self.train_samples,
                "validation_samples": self.validation_samples,
                "padding_efficiency": round(self.padding_efficiency, 4),
                "first_train_loss": train_rows[0]["train_loss"] if train_rows else None,
                "final_train_loss": train_rows[-1]["train_loss"] if train_rows else None,
                "final_val_loss": val_rows[-1]["val_loss"] if val_rows else None,
                "best_val_loss": self.state.best_val, "best_step": self.state.best_step,
                "stopped_early": self.stopped_early, "train_seconds": round(self.state.seconds, 2),
                "trainable_parameters": self.trainable_parameters}


def train(model, processor, train_rows, val_rows, cfg, *, checkpoints: Checkpoints, tmp: Path, name: str,
          log: logging.Logger, on_checkpoint: Callable[[list[dict[str, Any]]], None] | None = None) -> TrainResult:
    """Train ``model`` (LoRA-wrapped, from ``prepare_model``) on ``train_rows`` with the ``finetune.*``
    settings ``cfg``, resuming from ``checkpoints`` when they hold one. ``on_checkpoint(metrics)`` runs after
    each checkpoint. Returns with the final (or, after early stopping, the best) weights in ``model``."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm import tqdm
    from transformers import get_scheduler

    from pipeline.models.chat import collate, pad_token_id

    device, dtype = next(model.parameters()).device, model.dtype
    pad_id = pad_token_id(processor)
    train_set = Samples(train_rows, processor, cfg.max_length)
    val = Samples(val_rows, processor, cfg.max_length)
    if not len(train_set):
        raise StageError(f"finetune {name}: the train split is empty")
    plans: dict[int, list[list[int]]] = {0: plan_batches(train_set.lengths, cfg.batch_size, cfg.seed, 0)}
    per_epoch = len(plans[0])
    steps_per_epoch = max(1, per_epoch // cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    def batch_at(k: int) -> list[int]:
        epoch = k // per_epoch
        if epoch not in plans:
            plans[epoch] = plan_batches(train_set.lengths, cfg.batch_size, cfg.seed, epoch)
        return plans[epoch][k % per_epoch]

    efficiency = padding_efficiency(plans[0], train_set.lengths)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler("constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler, optimizer,
                              num_warmup_steps=round(cfg.warmup_ratio * total), num_training_steps=total)
    state = TrainState()
    if checkpoints.latest() is not None:
        state = checkpoints.load(model, optimizer, scheduler, name)
        log.info("finetune %s: resuming from checkpoint step %d of %d", name, state.step, total)
    trainable = sum(p.numel() for p in params)
    log.info("finetune %s: %d train / %d validation samples, %d steps (%d per epoch, batch %d x accum %d), "
             "padding efficiency %.3f, %s trainable LoRA parameters on %s (%s)", name, len(train_set), len(val),
             total, steps_per_epoch, cfg.batch_size, cfg.grad_accum, efficiency, f"{trainable:,}", device,
             str(dtype).removeprefix("torch."))

    def run_eval() -> bool:
        """Validation loss; returns True when early stopping says stop."""
        loss = evaluate(model, val, cfg.batch_size, pad_id, device, dtype) if len(val) else float("nan")
        state.metrics.append({"step": state.step, "epoch": round(state.step / steps_per_epoch, 4), "val_loss": loss})
        log.info("%s", _fmt({"eval_loss": loss, "epoch": round(state.step / steps_per_epoch, 2)}))
        if state.best_val is None or loss < state.best_val:
            state.best_val, state.best_step, state.bad_evals = loss, state.step, 0
            if cfg.early_stopping_patience:
                state.best_lora = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
        else:
            state.bad_evals += 1
        return bool(cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience)

    window = {"loss": 0.0, "steps": 0, "tokens": 0, "samples": 0, "started": time.perf_counter()}
    stopped_early = False
    bar = tqdm(total=total, initial=state.step, desc=f"finetune {name}", unit="step", disable=None)
    while state.step < total and not stopped_early:
        started = time.perf_counter()
        micro = [collate([train_set[i] for i in batch_at(state.step * cfg.grad_accum + a)], pad_id)
                 for a in range(cfg.grad_accum)]
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        step_loss = 0.0
        for batch in micro:  # token-weighted: each micro-batch's mean loss x its share of answer tokens
            loss, n = _batch_loss(model, _to_device(batch, device, dtype))
            (loss * n / n_tokens).backward()
            step_loss += float(loss.detach()) * n / n_tokens
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.seconds += time.perf_counter() - started
        window["loss"] += step_loss
        window["steps"] += 1
        window["tokens"] += sum(int(b["attention_mask"].sum()) for b in micro)
        window["samples"] += sum(len(b["input_ids"]) for b in micro)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}")
        if state.step % cfg.log_every == 0 or state.step == total:
            elapsed = max(time.perf_counter() - window["started"], 1e-9)
            row = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4),
                   "train_loss": window["loss"] / window["steps"], "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": window["tokens"] / elapsed, "samples_per_s": window["samples"] / elapsed}
            state.metrics.append(row)
            log.info("%s", _fmt({"loss": row["train_loss"], "grad_norm": grad_norm, "learning_rate": lr,
                                 "epoch": round(row["epoch"], 2)}))
            window.update(loss=0.0, steps=0, tokens=0, samples=0, started=time.perf_counter())
        if state.step % cfg.eval_every == 0 and state.step < total:
            stopped_early = run_eval()
        if state.step % cfg.save_every == 0 and state.step < total and not stopped_early:
            checkpoints.save(model, optimizer, scheduler, state, tmp)
            if on_checkpoint is not None:
                on_checkpoint(state.metrics)
    bar.close()
    if not stopped_early and (not state.metrics or state.metrics[-1].get("val_loss") is None
                              or state.metrics[-1]["step"] != state.step):
        run_eval()
    if state.best_lora is not None and (stopped_early or state.best_step != state.step):
        set_peft_model_state_dict(model, state.best_lora)
        log.info("finetune %s: keeping the best weights (step %d, validation loss %.4f)", name,
                 state.best_step, state.best_val)
    return TrainResult(state, total, len(train_set), len(val), efficiency, trainable, stopped_early)
