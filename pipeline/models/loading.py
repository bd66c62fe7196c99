"""Loading the student (Hub id or local folder) and attaching LoRA to its text model."""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("ielts_distill.models")

# The text model's modules; the vision tower stays frozen, the connector too unless finetune.train_connector.
TEXT_MODEL_PATTERN = r".*text_model.*\.({})$"


@contextmanager
def cpu_threads(single: bool):
    """torch's intra-op threads for a CPU-bound step (restored afterwards): one with ``single`` (the tiny
    student gains nothing from more), else the cores idle now (``pipeline.cpus``: a thread on a core another
    job keeps busy stalls the others), unless OMP_NUM_THREADS chose (torchrun sets 1 per process)."""
    import torch

    from pipeline.cpus import idle_cores

    previous = torch.get_num_threads()
    if single:
        torch.set_num_threads(1)
    elif not os.environ.get("OMP_NUM_THREADS"):
        threads = idle_cores()
        if threads != previous:
            log.info("torch: %d CPU thread(s), the cores idle now", threads)
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from pipeline.errors import PipelineError

        raise PipelineError("student.device is 'cuda' but no CUDA device is available")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX tiles or AVX512-BF16): only there are bf16 weights faster
    than fp32 (elsewhere oneDNN emulates them)."""
    import torch

    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def pick_dtype(device: str, bf16: bool = True, cpu_bf16: bool = False):
    """bf16 on CUDA (``bf16``) and on a CPU with native bf16 (``cpu_bf16``), else fp32."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if bf16 and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_bf16 and cpu_has_bf16() else torch.float32


def pick_attention(device: str, requested: str = "auto") -> str:
    """flash-attention 2 on CUDA when installed, else PyTorch SDPA."""
    if requested != "auto":
        return requested
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_processor(model_or_path: str | Path, image_longest_edge: int | None = None):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_or_path))
    if image_longest_edge:  # e.g. 4 * 384 for SmolVLM's own tiling, N * 512 for the 256M/500M models
        processor.image_processor.size = {"longest_edge": image_longest_edge}
    return processor


def load_student(model_or_path: str | Path, *, adapter: str | Path | None = None, device: str = "auto",
                 attn_implementation: str = "auto", bf16: bool = True, image_longest_edge: int | None = None,
                 trainable_adapter: bool = False, merge: bool = False, cpu_bf16: bool = False) -> tuple[Any, Any]:
    """(model, processor) for a Hub id or a local folder; with ``adapter`` (a PEFT folder) the LoRA
    weights are attached (``merge``: folded into the base weights, faster for inference). bf16 on CUDA,
    fp32 on CPU (bf16 with ``cpu_bf16`` on a CPU that has it: :func:`cpu_has_bf16`); SDPA attention
    (flash-attention 2 when installed). New LoRA adapters stay fp32 (PEFT upcasts them)."""
    from transformers import AutoModelForImageTextToText

    from pipeline.errors import PipelineError

    device = pick_device(device)
    dtype = pick_dtype(device, bf16, cpu_bf16)
    attn = pick_attention(device, attn_implementation)
    try:
        processor = load_processor(model_or_path, image_longest_edge)
        model = AutoModelForImageTextToText.from_pretrained(str(model_or_path), dtype=dtype,
                                                            attn_implementation=attn)
    except OSError as exc:
        raise PipelineError(f"cannot load student {str(model_or_path)!r}: {str(exc).splitlines()[0]}") from None
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable_adapter)
        if merge and not trainable_adapter:
            model = model.merge_and_unload()
    model.to(device)
    if not trainable_adapter:
        model.eval()
    log.debug("loaded %s on %s (%s, %s attention)", model_or_path, device, dtype, attn)
    return model, processor


def adapter_config(adapter: str | Path, label: str = "adapter") -> dict[str, Any]:
    """A PEFT adapter folder's ``adapter_config.json``; a missing or unreadable one is a one-line error
    naming ``label`` and the folder."""
    import json

    from pipeline.errors import PipelineError

    try:
        config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{label} {adapter}: no adapter_config.json (not a PEFT adapter folder)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{label} {adapter}: unreadable adapter_config.json ({exc.__class__.__name__})") from None
    return config if isinstance(config, dict) else {}


def trains_connector(adapter: str | Path) -> bool:
    """Whether a PEFT adapter folder carries its own trained connector (``finetune.train_connector``)."""
    return "connector" in (adapter_config(adapter).get("modules_to_save") or [])


PROMPT_SETTINGS = "student_prompt.json"  # beside an adapter's weights: how its training prompts were built


def save_prompt_settings(adapter: str | Path, train_rows) -> None:
    """Record in a saved adapter folder whether its training prompts held the chart's data: some row of
    ``train_rows`` (the dataset's train split) has a non-empty ``data`` (``student.table_in_prompt``)."""
    import json

    table_in_prompt = "data" in train_rows.column_names and any(train_rows["data"])
    (Path(adapter) / PROMPT_SETTINGS).write_text(json.dumps({"table_in_prompt": table_in_prompt}) + "\n")


def trained_with_data(adapter: str | Path) -> bool | None:
    """Whether an adapter was trained with the chart's data in its prompts; None when its folder does not say
    (an adapter saved before finetune recorded it, or by other code)."""
    import json

    from pipeline.errors import PipelineError

    path = Path(adapter) / PROMPT_SETTINGS
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("table_in_prompt")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise PipelineError(f"adapter {adapter}: unreadable {PROMPT_SETTINGS} ({exc.__class__.__name__})") from None
    if not isinstance(value, bool):
        raise PipelineError(f"adapter {adapter}: {PROMPT_SETTINGS} has no true/false 'table_in_prompt'")
    return value


def add_lora(model, *, r: int, alpha: int, dropout: float, target_modules: list[str], train_connector: bool = False):
    """Wrap ``model`` with fresh LoRA adapters on the text model's ``target_modules`` only; with
    ``train_connector`` the connector is trained in full too and saved with the adapter (PEFT's
    ``modules_to_save``: the base model keeps its own)."""
    from peft import LoraConfig, get_peft_model

    pattern = TEXT_MODEL_PATTERN.format("|".join(sorted(set(target_modules))))
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none",
                        task_type="CAUSAL_LM", modules_to_save=["connector"] if train_connector else None)
    return get_peft_model(model, config)
