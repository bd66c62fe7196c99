"""``ielts-distill write``: an essay for a new chart from the student (base model + optional LoRA adapter).

The base model comes from ``--model`` or, with only ``--adapter``, from the adapter's
``adapter_config.json`` (``base_model_name_or_path``). Either may be an ``s3://`` folder (the tiny
student's store URL, which finetune writes into its adapters): it is copied to a temporary folder first.
``--data FILE`` (the chart's CSV table or OCR text) goes into the user turn as the dataset stage puts it for
generate (``student.table_in_prompt``); an adapter whose ``student_prompt.json`` says it was trained so
needs it. Every failure a user can cause (missing or undecodable image or data file, adapter folder without a
config, base not found, adapter trained on another base, adapter trained with data and none given) is a
one-line PipelineError.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


def load_image(path: str | Path, max_pixels: int | None = None):
    """The chart as an RGB PIL image (transparency on white), decoded in full (a truncated file fails here,
    not mid-generation). Larger than ``max_pixels`` (``data.max_pixels``): refused before decoding."""
    from PIL import Image, UnidentifiedImageError

    from pipeline.models.images import to_rgb

    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"image not found: {p}")
    try:
        with Image.open(p) as img:
            if max_pixels and img.width * img.height > max_pixels:
                raise PipelineError(f"image {p} is {img.width}x{img.height} px, more than data.max_pixels="
                                    f"{max_pixels}: resize it first")
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
        raise PipelineError(f"cannot decode image {p}: {reason}") from None


def read_data(path: str | Path) -> str:
    """A chart's data file as the student's prompt gives it: a CSV table (header row first) or, for a ``.txt``
    file, OCR text, read by ingest's ``load_table`` and cut as the dataset stage cuts it (``student_data``)."""
    from pipeline.prompts import student_data
    from pipeline.stages.ingest import Rejected, load_table

    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"--data {p}: file not found")
    try:
        table, ocr_text = load_table(p, None)
    except Rejected as exc:
        raise PipelineError(f"--data {p}: {exc}") from None
    data = student_data({"table": table, "ocr_text": ocr_text})
    if not data:
        raise PipelineError(f"--data {p}: the file holds no text")
    return data


def check_data(adapter: Path, label: str, data: str) -> None:
    """The chart's data against the adapter's training prompts (``student_prompt.json``): trained with data and
    none given is an error; data given to one trained without it is used (the user asked) with a warning."""
    import sys

    from pipeline.models.loading import trained_with_data

    with_data = trained_with_data(adapter)
    if with_data and not data:
        raise PipelineError(f"--adapter {label} was trained with the chart's data in its prompt "
                            "(student.table_in_prompt): pass the chart's CSV table or OCR text with --data FILE")
    if with_data is False and data:
        print(f"warning: --adapter {label} was trained without the chart's data in its prompt; "
              "--data is used anyway", file=sys.stderr)


def adapter_base(adapter: str | Path) -> str:
    """The base model an adapter was trained on, from its adapter_config.json."""
    from pipeline.models.loading import adapter_config

    base = adapter_config(adapter, "--adapter").get("base_model_name_or_path")
    if not base:
        raise PipelineError(f"--adapter {adapter}: adapter_config.json names no base model; pass --model")
    if (base.startswith((".", "/")) or Path(base).is_absolute()) and not Path(base).exists():
        raise PipelineError(f"--adapter {adapter}: its base model {base} does not exist here; pass --model")
    return base


def _adapter_keys(adapter: Path) -> set[str]:
    from safetensors import safe_open

    path = adapter / "adapter_model.safetensors"
    if not path.is_file():
        return set()
    with safe_open(str(path), framework="pt") as fh:
        return set(fh.keys())


def local_copy(ref: str, tmp: Path, name: str) -> str:
    """``ref`` itself, or for an ``s3://bucket/key`` folder (the tiny student's store URL in an adapter's
    config, an adapter in the store) a local copy of it; credentials and endpoint from the environment."""
    if not ref.startswith("s3://"):
        return ref
    from urllib.parse import urlparse

    from pipeline.store import open_store

    url = urlparse(ref)
    key = url.path.strip("/")
    if not key:
        raise PipelineError(f"{ref}: expected s3://bucket/path/to/folder")
    return str(open_store(f"s3://{url.netloc}").download_dir(key, tmp / name))


def adapter_folder(path: str) -> str:
    """``path`` itself, or its ``adapter/`` when ``path`` is a variant folder (``finetune/<variant>/``)."""
    inner = Path(path) / "adapter"
    if not (Path(path) / "adapter_config.json").is_file() and (inner / "adapter_config.json").is_file():
        return str(inner)
    return path


def load(model: str | None, adapter: str | None, device: str, image_longest_edge: int | None,
         tmp: Path, data: str = "") -> tuple[Any, Any]:
    """(model, processor); an adapter that does not fit the base, or that needs ``data`` and has none, is a
    one-line error (``check_data``)."""
    from pipeline.models import load_student

    label = adapter
    adapter = adapter_folder(local_copy(adapter, tmp, "adapter")) if adapter else None
    base = model or (adapter_base(adapter) if adapter else None)
    base = local_copy(base, tmp, "base") if base else None
    if base is None:
        raise PipelineError("write needs --model or --adapter (to find the base model)")
    if adapter is None:
        return load_student(base, device=device, image_longest_edge=image_longest_edge)
    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise PipelineError(f"--adapter {adapter}: no adapter_config.json (not a PEFT adapter folder)")
    check_data(adapter_dir, label, data)
    try:
        loaded, processor = load_student(base, adapter=adapter_dir, device=device,
                                         image_longest_edge=image_longest_edge)
    except PipelineError:
        raise
    except (RuntimeError, ValueError, KeyError, AttributeError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [exc.__class__.__name__]
        reason = next((line for line in lines if "size mismatch" in line), lines[0])[:240]
        raise PipelineError(f"adapter {adapter} does not fit base model {base}: {reason}") from None
    _check_all_weights_loaded(loaded, adapter_dir, base)
    return loaded, processor


def _check_all_weights_loaded(model, adapter_dir: Path, base: str) -> None:
    """PEFT only warns when some adapter weights find no module; treat that as a misfit."""
    from peft import get_peft_model_state_dict

    stored = _adapter_keys(adapter_dir)
    if not stored:
        return
    with warnings.catch_warnings():  # peft looks for the base's config to check the vocabulary: not needed here
        warnings.simplefilter("ignore")
        expected = {k.removeprefix("base_model.model.") for k in get_peft_model_state_dict(model)}
    unused = {k.removeprefix("base_model.model.") for k in stored} - expected
    if unused:
        raise PipelineError(f"adapter {adapter_dir} does not fit base model {base}: {len(unused)} adapter weights "
                            f"match no module (e.g. {min(unused)})")


def write_essay(image: str | Path, title: str, *, adapter: str | None = None, model: str | None = None,
                device: str = "auto", max_new_tokens: int | None = None,
                image_longest_edge: int | None = None, max_pixels: int | None = None,
                decoding: dict[str, Any] | None = None, data: str | Path | None = None) -> str:
    """The essay; ``max_new_tokens`` unset: what a 190-word essay needs (the CLI passes the config's
    ``checks.generation_limit``, and ``generate.decoding()`` as ``decoding``, so it decodes as generate does).
    ``data``: the chart's data file (``read_data``), in the prompt as generate gives it. An essay cut at the
    limit is printed with a one-line warning on stderr."""
    import sys

    from transformers.utils import logging as hf_logging

    from pipeline.checks import tokens_needed
    from pipeline.models import generate_essays

    hf_logging.disable_progress_bar()  # stdout is the essay; keep stderr for errors
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not ours
    title = " ".join(title.split())  # as ingest reads a title
    if not title:
        raise PipelineError("--title is empty")
    picture = load_image(image, max_pixels)
    text = read_data(data) if data is not None else ""
    with tempfile.TemporaryDirectory(prefix="ielts-write-") as tmp:
        loaded, processor = load(model, adapter, device, image_longest_edge, Path(tmp), text)
    limit = max_new_tokens or tokens_needed(190)
    [result] = generate_essays(loaded, processor, [(picture, title, text)], max_new_tokens=limit, batch_size=1,
                               **(decoding or {}))
    if result.finish == "length":
        print(f"warning: the essay was cut at {limit} new tokens (--max-new-tokens)", file=sys.stderr)
    return result.text
