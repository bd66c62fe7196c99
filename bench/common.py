"""Shared bench helpers: the bundled sample's charts, the tiny student, and SmolVLM-256M's real shapes."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = Path(os.environ.get("IELTS_SAMPLE_DATA", REPO.parent / "shared" / "data" / "chart2text-sample"))


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / "manifest.jsonl").read_text().splitlines() if line.strip()]


def sample_charts(n: int) -> list[tuple]:
    """``n`` (PIL image, title) pairs from the bundled sample (cycled when n > 120)."""
    from PIL import Image

    rows = sample_rows()
    return [(Image.open(SAMPLE / rows[i % len(rows)]["image"]).convert("RGB"), rows[i % len(rows)]["title"])
            for i in range(n)]


def sample_texts() -> list[str]:
    rows = sample_rows()
    return [r.get("summary") or "" for r in rows] + [r["title"] for r in rows]


def tiny_student_dir() -> Path:
    from pipeline.models import build_tiny_student

    return build_tiny_student(Path(tempfile.mkdtemp(prefix="tiny-student-")), sample_texts())


def smolvlm_256m_like(device: str = "cpu", dtype=None):
    """A randomly initialised Idefics3 model with SmolVLM-256M-Instruct's shapes (SmolLM2-135M text model,
    SigLIP-B/16 at 512 px, pixel-shuffle 4: one 512-px tile = 64 visual tokens) and a processor that
    feeds it one 512-px tile per chart (the tiny student's tokenizer stands in for the real one)."""
    import torch
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor, Idefics3VisionConfig, LlamaConfig)

    from pipeline.models.chat import CHAT_TEMPLATE
    from pipeline.models.tiny import EOU, train_tokenizer

    tok = train_tokenizer(sample_texts())
    text = LlamaConfig(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.convert_tokens_to_ids(EOU), tie_word_embeddings=False)
    vision = Idefics3VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=512, patch_size=16)
    config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=4,
                            image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).to(device=device, dtype=dtype or torch.float32).eval()
    images = Idefics3ImageProcessorPil(size={"longest_edge": 512}, max_image_size={"longest_edge": 512},
                                       do_image_splitting=False)
    processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=64,
                                  chat_template=CHAT_TEMPLATE)
    return model, processor


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started
