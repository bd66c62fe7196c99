"""Chat formatting and label masking: one encoding path for training and generation.

A sample is a two-turn chat: the user turn holds the chart image, its title and the instruction
(``user_prompt``); the assistant turn holds the essay. The prompt (everything up to and including the
generation prompt ``Assistant:``) is encoded by the processor, which expands ``<image>`` into the image's
tokens; the answer is tokenized on its own and appended. So the ids the model trains on after the prompt
are exactly the ids generation continues from, and the label mask is exact by construction: -100 on the
prompt (image tokens included) and on padding, the token ids on the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
EOU = "<end_of_utterance>"

# SmolVLM-Instruct's own chat template (Idefics3 format); the tiny student ships the same one.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def user_prompt(title: str, data: str = "") -> str:
    """The instruction the student sees beside the chart image (the same for every model and variant), with
    the chart's data (``student.table_in_prompt``: the dataset's ``data`` column) after it when given."""
    text = (f'The chart is titled "{title.strip()}". Write an IELTS Academic Task 1 essay: summarise the '
            "information by selecting and reporting the main features, and make comparisons where relevant.")
    return f"{text}\n{data.strip()}" if data and data.strip() else text


def messages(title: str, essay: str | None = None, data: str = "") -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "image"},
                                                                {"type": "text", "text": user_prompt(title, data)}]}]
    if essay is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": essay}]})
    return turns


def prompt_text(processor, title: str, data: str = "") -> str:
    return processor.apply_chat_template(messages(title, data=data), add_generation_prompt=True, tokenize=False)


def answer_text(processor, title: str, essay: str, data: str = "") -> str:
    """The assistant turn as the chat template renders it after the generation prompt."""
    prompt = prompt_text(processor, title, data)
    full = processor.apply_chat_template(messages(title, essay, data), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the full chat")
    answer = full[len(prompt):]
    end = answer.rfind(EOU)  # the turn ends there: the template's newline after it is no answer token
    return answer[:end + len(EOU)] if end >= 0 else answer


@dataclass
class Encoded:
    """One sample's tensors before batching (pixel tensors: one row per image tile)."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: Any  # torch.FloatTensor [tiles, 3, H, W]
    pixel_attention_mask: Any  # torch.BoolTensor [tiles, H, W]

    def __len__(self) -> int:
        return len(self.input_ids)


def shrink(image, processor):
    """RGB (transparency composited on white), and box-filtered down to at most twice the processor's longest
    edge when it is far larger (a cheap integer ``reduce`` before the processor's own LANCZOS resize)."""
    from pipeline.models.images import to_rgb

    size = processor.image_processor.size
    edge = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    image = to_rgb(image)
    factor = max(image.size) // (2 * edge) if edge else 0
    return image.reduce(factor) if factor >= 2 else image


def encode(processor, image, title: str, essay: str | None = None, max_length: int | None = None,
           data: str = "") -> Encoded:
    """Encode one chart (and, for training, its essay). Long answers are cut to ``max_length``; a prompt
    that alone exceeds it raises ValueError (the image tokens are never cut). ``data``: see user_prompt."""
    import torch

    batch = processor(text=[prompt_text(processor, title, data)], images=[[shrink(image, processor)]],
                      return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    prompt_len = len(ids)
    if max_length is not None and prompt_len > max_length:
        raise ValueError(f"prompt of {prompt_len} tokens (image included) exceeds max_length={max_length}")
    labels = [IGNORE_INDEX] * prompt_len
    if essay is not None:
        answer = processor.tokenizer(answer_text(processor, title, essay, data), add_special_tokens=False)["input_ids"]
        ids, labels = ids + answer, labels + answer
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    mask = batch.get("pixel_attention_mask")
    pixels = batch["pixel_values"][0]
    return Encoded(ids, labels, pixels,
                   mask[0].bool() if mask is not None else torch.ones(pixels.shape[0], *pixels.shape[2:],
                                                                       dtype=torch.bool))


def pad_token_id(processor) -> int:
    """The id ``collate`` pads with: the tokenizer's pad token, else its end-of-sequence token."""
    tok = processor.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def pad_tiles(items: list[Encoded]):
    """The charts' image tiles as [charts, max tiles, 3, H, W] pixels and [charts, max tiles, H, W] masks,
    padded with zero tiles (Idefics3 drops all-zero tiles)."""
    import torch

    tiles = max(x.pixel_values.shape[0] for x in items)
    h = max(x.pixel_values.shape[2] for x in items)
    w = max(x.pixel_values.shape[3] for x in items)
    pixels = torch.zeros((len(items), tiles, 3, h, w), dtype=items[0].pixel_values.dtype)
    pmask = torch.zeros((len(items), tiles, h, w), dtype=torch.bool)
    for i, x in enumerate(items):
        t, _, ph, pw = x.pixel_values.shape
        pixels[i, :t, :, :ph, :pw] = x.pixel_values
        pmask[i, :t, :ph, :pw] = x.pixel_attention_mask
    return pixels, pmask


def collate(items, pad_id: int, side: str = "right", pixels: bool = True) -> dict[str, Any]:
    """Pad a batch: token ids (``side``), labels with -100, attention mask, and (``pixels``) the image tiles
    (``pad_tiles``). Training pads right, generation pads left. Without ``pixels`` the items need only
    ``input_ids`` and ``labels`` (the vision features come from a ``ChartCache``)."""
    import torch

    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x.input_ids)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, cols] = torch.tensor(x.input_ids)
        labels[i, cols] = torch.tensor(x.labels)
        attn[i, cols] = 1
    out = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    if pixels:
        out["pixel_values"], out["pixel_attention_mask"] = pad_tiles(items)
    return out
