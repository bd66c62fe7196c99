"""Charts prepared once: the prompt's token ids and the frozen vision features (vision tower + connector).

LoRA trains the text model only, so what the vision tower and connector make of a chart never changes:
``ChartCache.fill`` encodes each chart once (processor, on a thread pool) and runs the vision side once
(batched, no grad), and training epochs, evaluations, both variants and all three generation models then
feed the stored features to the text model (``mm_encoder_outputs``) instead of pixels. Entries live in
memory or, with ``directory``, one file per chart (the pod's disk; DataLoader workers read them). A cache
is tied to one base model, image setting and dtype: ``cache_tag`` names it, and a folder is never shared
between tags.

With ``finetune.train_connector`` the connector is trained, so the cache holds the vision tower's output
instead (``before_connector``: [tiles, patches, hidden] per chart) and each model applies its own connector
to it at every step (``encoder_outputs``): the baseline its random one, each adapter the one it trained.
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


def cache_tag(base: str, processor, dtype, before_connector: bool = False) -> str:
    """What the features depend on: the base model, the processor's image settings, the dtype and whether
    they are taken before the connector."""
    img = processor.image_processor
    settings = (str(base), getattr(img, "size", None), getattr(img, "max_image_size", None), str(dtype))
    settings += ("tower",) if before_connector else ()  # the post-connector tags of earlier runs stay valid
    return hashlib.sha256(repr(settings).encode()).hexdigest()[:16]


def shared_cache(caches: dict[str, ChartCache], base: str, processor, dtype, directory: Path,
                 before_connector: bool = False) -> ChartCache:
    """The one cache in ``caches`` for this base, image setting, dtype and level (made on first use)."""
    tag = cache_tag(base, processor, dtype, before_connector)
    return caches.setdefault(tag, ChartCache(tag, directory, before_connector))


def encoder_outputs(model, features) -> dict[str, Any]:
    """``mm_encoder_outputs`` for the text model from cached features: post-connector features
    ([tokens, hidden]) as they are; the tower's output ([tiles, patches, hidden]) through ``model``'s own
    connector (the trained one under an adapter with ``train_connector``)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if features.dim() == 3:
        features = base_model(model).model.connector(features)
        features = features.reshape(-1, features.shape[-1])
    return {"image": BaseModelOutputWithPooling(pooler_output=features)}


def _file_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32] + ".pt"


class ChartCache:
    """{chart key: prompt ids + vision features [tiles x image_seq_len, hidden]} for one ``tag``; with
    ``before_connector`` the tower's output [tiles, patches, tower hidden] instead."""

    def __init__(self, tag: str, directory: str | Path | None = None, before_connector: bool = False):
        self.tag, self.before_connector = tag, before_connector
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

    def batch_features(self, keys: Iterable[str], model):
        """``mm_encoder_outputs`` of ``model`` for a batch: the charts' features in batch order, as the model's
        own ``get_image_features`` returns them."""
        import torch

        feats = torch.cat([self.features(k) for k in keys])
        return encoder_outputs(model, feats.to(next(model.parameters()).device, model.dtype))

    def fill(self, model, processor, charts: Mapping[str, tuple[Any, ...]], batch_size: int = 8) -> int:
        """Encode and run the vision side for every chart ``(PIL image, title)`` or ``(PIL image, title, data)``
        not cached yet; returns how many were added. A chart the processor rejects raises ValueError naming
        its key."""
        import torch

        from pipeline.models.chat import encode, pad_tiles

        todo = [k for k in charts if k not in self]
        if not todo:
            return 0
        vision = base_model(model)
        device, dtype = next(model.parameters()).device, model.dtype

        def prepare(key: str):
            try:
                image, title, *data = charts[key]
                return key, encode(processor, image, title, data=data[0] if data else "")
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
                        out = vision.get_image_features(pixels.to(device, dtype), masks.to(device), return_dict=True)
                    per_chart = out.pooler_output
                    if self.before_connector:  # every tile gives the connector the same number of tokens
                        tiles = out.last_hidden_state
                        per_tile = sum(f.shape[0] for f in per_chart) // tiles.shape[0]
                        per_chart = tiles.split([f.shape[0] // per_tile for f in per_chart])
                    for (key, enc), feats in zip(done, per_chart):
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

