"""The tiny random student: SmolVLM's architecture (Idefics3: SigLIP-style vision tower, pixel-shuffle
connector, Llama text model) at toy size, so loading, LoRA training, saving and generation run for real on
a CPU in seconds. Its BPE tokenizer is trained on the run's own essays and titles; its weights are random,
so its essays are gibberish until (and mostly after) fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipeline.models.chat import CHAT_TEMPLATE, user_prompt

VOCAB_SIZE = 600
IMAGE_SIZE = 64  # vision tower input (px) = one tile
PATCH_SIZE = 16
SCALE_FACTOR = 2  # pixel shuffle: (64/16)^2 / 2^2 = 4 visual tokens per tile
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
LONGEST_EDGE = 2 * IMAGE_SIZE  # images are split into up to 2x2 tiles plus the global view
INIT_RANGE = 0.1  # wider than the usual 0.02: logits through the frozen random lm_head can then move

BOS, EOU, PAD = "<|im_start|>", "<end_of_utterance>", "<|endoftext|>"
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>",
                *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))]
SPECIAL_TOKENS = [PAD, BOS, EOU, *IMAGE_TOKENS]


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer (like SmolLM2's) whose special tokens are single ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [*texts, user_prompt("Title"), "User: Assistant:"]
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOU, pad_token=PAD,
                                   additional_special_tokens=[EOU, *IMAGE_TOKENS], model_max_length=4096)


def build_tiny_processor(texts: Iterable[str]):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    tokenizer = train_tokenizer(texts)  # special tokens exist BEFORE the processor looks them up
    images = Idefics3ImageProcessorPil(size={"longest_edge": LONGEST_EDGE},
                                       max_image_size={"longest_edge": IMAGE_SIZE}, do_image_splitting=True)
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN,
                             chat_template=CHAT_TEMPLATE)


def tiny_config(tokenizer):
    from transformers import Idefics3Config, Idefics3VisionConfig, LlamaConfig

    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.convert_tokens_to_ids(EOU), tie_word_embeddings=False,
                       initializer_range=INIT_RANGE)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    return Idefics3Config(text_config=text, vision_config=vision, scale_factor=SCALE_FACTOR,
                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)


def build_tiny_student(out_dir: str | Path, texts: Iterable[str], seed: int = 0) -> Path:
    """Train the tokenizer on ``texts`` (essays and titles), build a random tiny Idefics3 model and save
    model + processor to ``out_dir`` (loadable with ``load_student(out_dir)``)."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("the tiny student's tokenizer needs at least one text to train on")
    processor = build_tiny_processor(texts)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(tiny_config(processor.tokenizer))
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def texts_from_file(path: str | Path) -> list[str]:
    """Texts for the tokenizer: JSONL rows (their essay/title/summary fields) or plain lines."""
    import json

    texts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = line
        if isinstance(row, dict):
            texts += [str(row[k]) for k in ("essay", "title", "summary") if row.get(k)]
        else:
            texts.append(str(row))
    return texts
