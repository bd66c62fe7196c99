"""Charts prepared once: the prompt's token ids and the frozen vision features (vision tower + connector).

LoRA trains the text model only, so what the vision tower and connector make of a chart never changes:
``ChartCache.fill`` encodes each chart once (processor, on a thread pool) and runs the vision side once
(batched, no grad), and training epochs, evaluations, both variants and all three generation models then
feed the stored features to the text model (``mm_encoder_outputs``) instead of pixels. Entries live in
memory or, with ``directory``, one file per chart (the pod's disk; DataLoader workers read them). A cache
is tied to one base model, image setting and dtype: ``cache_tag`` names it, and a folder is never shared
between tags.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_tag(base: str, processor, dtype) -> str:
    """What the features depend on: the base model, the processor's image settings and the dtype."""
    img = processor.image_processor
    settings = repr((str(base), getattr(img, "size", None), getattr(img, "max_image_size", None), str(dtype)))
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def _file_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32] + ".pt"


class ChartCache:
    """{chart key: prompt ids + vision features [tiles x image_seq_len, hidden]} for one ``tag``."""

    def __init__(self, tag: str, directory: str | Path | None = None):
        self.tag = tag
        self.directory = Path(directory) / tag if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.prompts: dict[str, list[int]] = {}
        self._features: dict[str, Any] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.prompts

    def prompt_ids(self, key: str) -> list[int]:
        return self.prompts[key]

    def features(self, key: str):
        """The chart's features (CPU tensor); read from ``directory`` when it has one."""
        if self.directory is None:
            return self._features[key]
        import torch

        return torch.load(self.directory / _file_name(key), map_location="cpu", weights_only=True)

    def batch_features(self, keys: Iterable[str]):
        """``mm_encoder_outputs`` for a batch: the charts' features in batch order, as the model's own
        ``get_image_features`` returns them."""
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=torch.cat([self.features(k) for k in keys]))}

    def fill(self, model, processor, charts: Mapping[str, tuple[Any, str]], batch_size: int = 8) -> int:
        """Encode and run the vision side for every chart ``(PIL image, title)`` not cached yet; returns how
        many were added. A chart the processor rejects raises ValueError naming its key."""
        import torch

        from pipeline.models.chat import encode, pad_tiles

        todo = [k for k in charts if k not in self]
        if not todo:
            return 0
        vision = base_model(model)
        device, dtype = next(model.parameters()).device, model.dtype

        def prepare(key: str):
            try:
                return key, encode(processor, *charts[key])
            except ValueError as exc:
                raise ValueError(f"chart {key}: {exc}") from None

        was_training = model.training
        model.eval()
        try:
            with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # PIL resizes off the GIL
                for start in range(0, len(todo), batch_size):
                    done = list(pool.map(prepare, todo[start:start + batch_size]))
                    pixels, masks = pad_tiles([enc for _, enc in done])
                    with torch.no_grad():
                        out = vision.get_image_features(pixels.to(device, dtype), masks.to(device),
                                                        return_dict=True).pooler_output
                    for (key, enc), feats in zip(done, out):
                        self._put(key, enc.input_ids, feats.detach().to("cpu").contiguous())
        finally:
            model.train(was_training)
        return len(todo)

    def _put(self, key: str, prompt_ids: list[int], feats) -> None:
        if self.directory is None:
            self._features[key] = feats
        else:
            import torch

            path = self.directory / _file_name(key)
            torch.save(feats.clone(), path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
        self.prompts[key] = prompt_ids

