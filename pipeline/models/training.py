"""A small LoRA trainer for the student: samples, batch plan, step, evaluation, checkpoint and resume.

A plain PyTorch loop (simpler to keep resume exact than Trainer's):
- **samples**: every chart is encoded and its frozen vision features (vision tower + connector) computed
  once (``features.ChartCache``); a sample is then its token ids, labels and the chart's cached features,
  so epochs, evaluations and variants never run the vision side again. Lengths come from those ids.
- **input pipeline**: a ``torch.utils.data.DataLoader`` over the batch plan (length-grouped batches, a pure
  function of the seed and epoch), with workers, pinned memory and prefetch on CUDA; the time the loop
  waits for data is measured (``data_wait_share`` in the metrics).
- **step**: the loss is computed at answer positions only (the LM head never sees prompt or image
  positions), token-weighted over gradient accumulation; AdamW, cosine/linear/constant schedule with
  warm-up, gradient clipping, optional gradient checkpointing.
- **evaluation**: every ``eval_every`` steps on a fixed subset of ``val_subset`` validation charts (early
  stopping keeps the best weights), on the full validation set at the end.
- **checkpoint / resume**: ``Checkpoints`` (``step-<N>/`` = adapter + ``state.pt`` with optimizer,
  scheduler, RNG and metrics, then ``latest.json`` with the run's fingerprint) under a store prefix the
  caller chooses; also on SIGTERM (a preempted pod), then the run stops. A resumed run continues exactly
  where an uninterrupted one would be.
- **data parallel**: under ``torch.distributed`` (torchrun; gloo on CPU, NCCL on GPUs) each process takes
  its share of every batch and the LoRA gradients are summed, so N processes train with the same global
  batch and loss curve as one; rank 0 alone writes.
The finetune stage owns what is trained and where the results go; this module owns how.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import StageError

MEGABATCH = 50  # length grouping: sort within windows of MEGABATCH batches, then shuffle the batches


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Dist:
    """This process's place among the data-parallel ones (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Dist:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, batch: list[int]) -> list[int]:
        """This process's part of a global batch."""
        return batch[self.rank::self.world]

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the processes."""
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def sum_grads(self, params) -> None:
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def init_distributed() -> Dist:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, else gloo)."""
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ or (dist.is_available() and dist.is_initialized()):
        return Dist.current()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist.current()


# --------------------------------------------------------------------------- samples and batches


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    key: str  # the chart's ChartCache key


class Samples:
    """A split ready for training: each row's prompt ids (from the ChartCache, which encodes the chart and
    runs the vision side once) + its answer's ids, cut to ``max_length``; a torch map-style dataset whose
    items also carry the chart's vision features."""

    def __init__(self, rows, processor, cache, model, max_length: int, chunk: int = 64):
        from pipeline.models.chat import IGNORE_INDEX, answer_text

        self.cache = cache
        self.items: list[Sample] = []
        for start in range(0, len(rows), chunk):
            part = rows.select(range(start, min(start + chunk, len(rows)))) if hasattr(rows, "select") \
                else rows[start:start + chunk]
            try:
                cache.fill(model, processor, {r["chart_id"]: (r["image"], r["title"], r.get("data") or "")
                                              for r in part})
            except ValueError as exc:
                raise StageError(str(exc)) from None
            for r in part:
                prompt = cache.prompt_ids(r["chart_id"])
                if len(prompt) > max_length:
                    raise StageError(f"chart {r['chart_id']}: prompt of {len(prompt)} tokens (image included) "
                                     f"exceeds max_length={max_length}")
                answer = processor.tokenizer(answer_text(processor, r["title"], r["essay"], r.get("data") or ""),
                                             add_special_tokens=False)["input_ids"]
                ids = (prompt + answer)[:max_length]
                labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
                self.items.append(Sample(ids, labels, r["chart_id"]))
        self.lengths = [len(x.input_ids) for x in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Sample, Any]:
        return self.items[i], self.cache.features(self.items[i].key)


class Collate:
    """Right-padded ids, labels and attention mask, plus the batch's vision features concatenated in order
    (``mm_encoder_outputs`` is built on the model's side). A top-level class so DataLoader workers can use it."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[Sample, Any]]) -> dict[str, Any] | None:
        import torch

        from pipeline.models.chat import collate

        if not items:
            return None  # this process's share of a batch smaller than the number of processes
        batch = collate([s for s, _ in items], self.pad_id, pixels=False)
        batch["features"] = torch.cat([f for _, f in items])
        return batch


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


class BatchPlan:
    """The micro-batches from number ``start`` to ``stop`` (epochs follow each other), this process's share
    of each: the batch sampler of the training DataLoader."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, start: int, stop: int, dist: Dist):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.start, self.stop, self.dist = start, stop, dist
        self.plans: dict[int, list[list[int]]] = {0: plan_batches(lengths, batch_size, seed, 0)}
        self.per_epoch = len(self.plans[0])

    def at(self, k: int) -> list[int]:
        epoch = k // self.per_epoch
        if epoch not in self.plans:
            self.plans[epoch] = plan_batches(self.lengths, self.batch_size, self.seed, epoch)
        return self.plans[epoch][k % self.per_epoch]

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        for k in range(self.start, self.stop):
            yield self.dist.share(self.at(k))


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
RESUME_NEUTRAL = {"variants", "save_every", "log_every", "gpus", "gradient_checkpointing", "num_workers", "cpu_bf16"}


MIGRATED_KEYS = ("student.tiny",)  # student.tiny: build: tiny said the same (student.build is compared)


def config_fingerprint(cfg) -> dict[str, Any]:
    """The ``finetune.*`` part of a checkpoint's fingerprint (the caller adds the data and the base model)."""
    return {f"finetune.{k}": v for k, v in cfg.model_dump(mode="json").items() if k not in RESUME_NEUTRAL}


def fingerprint_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """``key old -> new`` for every key whose value differs (a checkpoint without a fingerprint: all)."""
    import json

    saved = json.loads(json.dumps(saved or {}))  # tuples and lists compare alike
    for old in MIGRATED_KEYS:  # checkpoints of older versions carry keys that are gone (same meaning)
        saved.pop(old, None)
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


def answer_loss(model, batch: dict[str, Any], device, dtype):
    """(summed cross-entropy over the batch's answer tokens, number of those tokens). The text model runs
    on the cached vision features, and the LM head only at the positions that carry a label; the loss is
    taken in fp32 whatever the weights' dtype."""
    import torch.nn.functional as F

    from pipeline.models.chat import IGNORE_INDEX
    from pipeline.models.features import base_model, encoder_outputs

    base = base_model(model)
    features = batch["features"].to(device, dtype, non_blocking=True)
    labels = batch["labels"][:, 1:].to(device, non_blocking=True)
    keep = labels != IGNORE_INDEX
    hidden = base.model(input_ids=batch["input_ids"].to(device, non_blocking=True),
                        attention_mask=batch["attention_mask"].to(device, non_blocking=True),
                        mm_encoder_outputs=encoder_outputs(base, features), use_cache=False).last_hidden_state
    logits = base.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), int(keep.sum())


def evaluate(model, samples: Samples, indices: list[int], batch_size: int, collate: Collate, device, dtype) -> float:
    """Mean loss per answer token over ``indices`` (batched by length)."""
    import torch

    model.eval()
    order = sorted(indices, key=lambda i: samples.lengths[i])
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            loss, n = answer_loss(model, collate([samples[i] for i in order[start:start + batch_size]]), device, dtype)
            total, tokens = total + float(loss), tokens + n
    model.train()
    return total / max(tokens, 1)


def val_subset(n: int, size: int | None, seed: int) -> list[int]:
    """The fixed validation subset evaluated during training (all of it when ``size`` is unset or larger)."""
    if not size or size >= n:
        return list(range(n))
    return sorted(random.Random(f"{seed}-validation").sample(range(n), size))


class Preemption:
    """Remembers a SIGTERM (a pod being preempted or deleted) so the loop can checkpoint and stop between
    steps; the previous handler comes back afterwards. Outside the main thread it does nothing."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


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
                                    bf16=cfg.bf16, cpu_bf16=cfg.cpu_bf16, image_longest_edge=student.image_longest_edge)
    model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     target_modules=cfg.target_modules, train_connector=cfg.train_connector)
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


def train(model, processor, train_rows, val_rows, cfg, *, cache, checkpoints: Checkpoints, tmp: Path, name: str,
          log: logging.Logger, on_checkpoint: Callable[[list[dict[str, Any]]], None] | None = None) -> TrainResult:
    """Train ``model`` (LoRA-wrapped, from ``prepare_model``) on ``train_rows`` with the ``finetune.*``
    settings ``cfg``, resuming from ``checkpoints`` when they hold one; ``cache`` (a ``ChartCache`` of this
    base model) holds the charts' prompts and vision features. ``on_checkpoint(metrics)`` runs after each
    checkpoint. Returns with the final (or, after early stopping, the best) weights in ``model``. Under
    torch.distributed every process calls this; only rank 0 writes."""
    from tqdm import tqdm

    t = Trainer(model, processor, train_rows, val_rows, cfg, cache=cache, checkpoints=checkpoints, tmp=tmp,
                name=name, log=log, on_checkpoint=on_checkpoint)
    state, stopped_early = t.state, False
    batches = iter(t.loader)
    bar = tqdm(total=t.total, initial=state.step, desc=f"finetune {name}", unit="step",
               disable=None if t.dist.main else True)
    with Preemption() as preemption:
        while state.step < t.total and not stopped_early:
            step_loss, lr, stop = t.step(batches, preemption)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}")
            if stop:
                t.save()
                raise StageError(f"finetune {name}: stopped by SIGTERM at step {state.step} of {t.total}; "
                                 "the checkpoint is saved and a rerun resumes from it")
            if state.step % cfg.eval_every == 0 and state.step < t.total:
                stopped_early = t.run_eval(t.val_during)
            if state.step % cfg.save_every == 0 and state.step < t.total and not stopped_early:
                t.save()
    bar.close()
    del batches
    return t.finish(stopped_early)


class Trainer:
    """One variant's training: setup (data, optimizer, scheduler, resume) here, then ``step`` per optimizer
    step (its metrics window logged every ``log_every``), ``run_eval``, ``save`` and ``finish``; ``train``
    holds the loop."""

    def __init__(self, model, processor, train_rows, val_rows, cfg, *, cache, checkpoints: Checkpoints, tmp: Path,
                 name: str, log: logging.Logger, on_checkpoint: Callable[[list[dict[str, Any]]], None] | None):
        import torch
        from transformers import get_scheduler

        from pipeline.models.chat import pad_token_id

        self.model, self.cfg, self.checkpoints, self.tmp, self.name, self.log = model, cfg, checkpoints, tmp, name, log
        self.on_checkpoint = on_checkpoint
        self.dist = Dist.current()
        self.device, self.dtype = next(model.parameters()).device, model.dtype
        if cfg.cpu_bf16 and self.device.type == "cpu" and self.dtype != torch.bfloat16 and self.dist.main:
            log.warning("finetune.cpu_bf16: this CPU has no native bf16 (AMX or AVX512-BF16); training in float32")
        self.collate = Collate(pad_token_id(processor))
        self.train_set = Samples(train_rows, processor, cache, model, cfg.max_length)
        self.val = Samples(val_rows, processor, cache, model, cfg.max_length)
        if not len(self.train_set):
            raise StageError(f"finetune {name}: the train split is empty")
        per_epoch = len(plan_batches(self.train_set.lengths, cfg.batch_size, cfg.seed, 0))
        self.steps_per_epoch = max(1, per_epoch // cfg.grad_accum)
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.val_during = val_subset(len(self.val), cfg.val_subset, cfg.seed)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = get_scheduler("constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler,
                                       self.optimizer, num_warmup_steps=round(cfg.warmup_ratio * self.total),
                                       num_training_steps=self.total)
        self.state = TrainState()
        if checkpoints.latest() is not None:
            self.state = checkpoints.load(model, self.optimizer, self.scheduler, name)
            log.info("finetune %s: resuming from checkpoint step %d of %d", name, self.state.step, self.total)
        self.loader, self.efficiency = self._loader(torch)
        self.trainable = sum(p.numel() for p in self.params)
        self._log_setup()
        self.window = self._new_window()

    def _loader(self, torch):
        from torch.utils.data import DataLoader

        cfg, device = self.cfg, self.device
        plan = BatchPlan(self.train_set.lengths, cfg.batch_size, cfg.seed, self.state.step * cfg.grad_accum,
                         self.total * cfg.grad_accum, self.dist)
        workers = cfg.num_workers if cfg.num_workers is not None else (min(4, os.cpu_count() or 1)
                                                                       if device.type == "cuda" else 0)
        loader = DataLoader(self.train_set, batch_sampler=plan, collate_fn=self.collate, num_workers=workers,
                            pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                            generator=torch.Generator().manual_seed(cfg.seed))  # global RNG (dropout) untouched
        return loader, padding_efficiency(plan.plans[0], self.train_set.lengths)

    def _log_setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        if dist.main:
            self.log.info(
                "finetune %s: %d train / %d validation samples (%d evaluated during training), %d steps (%d per "
                "epoch, batch %d x accum %d%s), padding efficiency %.3f, %s trainable LoRA parameters on %s (%s), "
                "%d data workers", self.name, len(self.train_set), len(self.val), len(self.val_during), self.total,
                self.steps_per_epoch, cfg.batch_size, cfg.grad_accum,
                f" over {dist.world} processes" if dist.world > 1 else "", self.efficiency, f"{self.trainable:,}",
                self.device, str(self.dtype).removeprefix("torch."),
                self.loader.num_workers)

    @staticmethod
    def _new_window() -> dict[str, float]:
        return {"loss": 0.0, "steps": 0, "tokens": 0, "samples": 0, "wait": 0.0, "started": time.perf_counter()}

    def step(self, batches, preemption) -> tuple[float, float, bool]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (loss, learning rate, stop requested
        by any process)."""
        import torch

        cfg, dist, state = self.cfg, self.dist, self.state
        started = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        waited = time.perf_counter() - started
        mine = [b for b in micro if b is not None]
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in mine)
        n_tokens, n_real, n_samples = dist.sum([local_tokens, sum(int(b["attention_mask"].sum()) for b in mine),
                                                sum(len(b["input_ids"]) for b in mine)])
        step_loss = 0.0
        for batch in mine:  # token-weighted: summed over the global batch's answer tokens, then divided
            loss, _ = answer_loss(self.model, batch, self.device, self.dtype)
            (loss / n_tokens).backward()
            step_loss += float(loss.detach()) / n_tokens
        dist.sum_grads(self.params)
        step_loss, stop = dist.sum([step_loss, float(preemption.requested)])
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, 1.0))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.seconds += time.perf_counter() - started
        w = self.window
        w["loss"], w["steps"], w["tokens"] = w["loss"] + step_loss, w["steps"] + 1, w["tokens"] + n_real
        w["samples"], w["wait"] = w["samples"] + n_samples, w["wait"] + waited
        if state.step % cfg.log_every == 0 or state.step == self.total:
            self._log_window(lr, grad_norm)
        return step_loss, lr, bool(stop)

    def _log_window(self, lr: float, grad_norm: float) -> None:
        w, state = self.window, self.state
        elapsed = max(time.perf_counter() - w["started"], 1e-9)
        row = {"step": state.step, "epoch": round(state.step / self.steps_per_epoch, 4),
               "train_loss": w["loss"] / w["steps"], "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": w["tokens"] / elapsed, "samples_per_s": w["samples"] / elapsed,
               "data_wait_share": round(w["wait"] / elapsed, 4)}
        state.metrics.append(row)
        if self.dist.main:
            self.log.info("%s", _fmt({"loss": row["train_loss"], "grad_norm": grad_norm, "learning_rate": lr,
                                      "epoch": round(row["epoch"], 2)}))
        self.window = self._new_window()

    def run_eval(self, indices: list[int], track: bool = True) -> bool:
        """Validation loss; returns True when early stopping says stop. ``track``: the loss takes part in
        choosing the best weights (only losses on the same charts are compared)."""
        from peft import get_peft_model_state_dict

        state, cfg = self.state, self.cfg
        loss = evaluate(self.model, self.val, indices, cfg.batch_size, self.collate, self.device,
                        self.dtype) if indices else float("nan")
        row = {"step": state.step, "epoch": round(state.step / self.steps_per_epoch, 4), "val_loss": loss}
        if len(indices) < len(self.val):
            row["val_charts"] = len(indices)
        state.metrics.append(row)
        if self.dist.main:
            self.log.info("%s", _fmt({"eval_loss": loss, "epoch": round(state.step / self.steps_per_epoch, 2)}))
        if not track:
            return False
        if state.best_val is None or loss < state.best_val:
            state.best_val, state.best_step, state.bad_evals = loss, state.step, 0
            if cfg.early_stopping_patience:
                state.best_lora = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        else:
            state.bad_evals += 1
        return bool(cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience)

    def save(self) -> None:
        if self.dist.main:
            self.checkpoints.save(self.model, self.optimizer, self.scheduler, self.state, self.tmp)
            if self.on_checkpoint is not None:
                self.on_checkpoint(self.state.metrics)

    def finish(self, stopped_early: bool) -> TrainResult:
        """The full validation set at the end, then the best weights when they are not the last ones."""
        from peft import set_peft_model_state_dict

        state = self.state
        last = state.metrics[-1] if state.metrics else {}
        if not stopped_early and ("val_loss" not in last or last["step"] != state.step or "val_charts" in last):
            self.run_eval(list(range(len(self.val))), track=len(self.val_during) == len(self.val))
        if state.best_lora is not None and (stopped_early or state.best_step != state.step):
            set_peft_model_state_dict(self.model, state.best_lora)
            if self.dist.main:
                self.log.info("finetune %s: keeping the best weights (step %d, validation loss %.4f)", self.name,
                              state.best_step, state.best_val)
        return TrainResult(state, self.total, len(self.train_set), len(self.val), self.efficiency, self.trainable,
                           stopped_early)
