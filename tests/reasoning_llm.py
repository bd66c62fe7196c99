"""A loopback OpenAI-compatible server that behaves like a hosted reasoning model (MiniMax-M1, DeepSeek-R1,
o-series): it thinks before it answers, and the thinking counts against the request's token limit.

- ``think_tokens`` tokens of reasoning come first; the answer follows. A token is 4 characters here, as in
  the usage numbers.
- The limit is ``max_completion_tokens`` or else ``max_tokens``; when reasoning plus answer exceed it the
  completion is cut there and ``finish_reason`` is ``"length"`` (a cut during thinking leaves no answer).
- ``separate_field``: the reasoning comes in ``message.reasoning_content`` (DeepSeek/MiniMax style) and
  ``content`` holds only the answer; otherwise it is inline as ``<think>…</think>``.
- ``rate_limit_every``: every n-th request gets ``429`` with ``Retry-After`` first (from ``FakeLLM``).
- ``minimax=True``: MiniMax's documented limits (docs/teacher.md), written out here independently of
  pipeline/minimax.py: a request of a MiniMax model with a temperature outside (0, 1], a token limit above
  2048, or image parts for a model other than MiniMax-M3 gets ``400`` (the reason is kept in ``rejected``);
  the thinking comes inside ``content`` as ``<think>…</think>``, as the M2.x models send it.
"""

from __future__ import annotations

import time
from typing import Any

from fake_llm import FakeLLM, prompt_text

CHARS_PER_TOKEN = 4


MINIMAX_CAP = 2048  # max_tokens / max_completion_tokens, thinking included
MINIMAX_VISION = ("minimax-m3",)  # the models MiniMax documents image understanding for


def minimax_violations(request: dict[str, Any]) -> list[str]:
    """Why MiniMax's API would refuse ``request`` (empty: it would not, or the model is not MiniMax's)."""
    model = str(request.get("model", ""))
    if "minimax" not in model.lower():
        return []
    out = []
    temperature = request.get("temperature")
    if temperature is not None and not 0 < float(temperature) <= 1:
        out.append(f"invalid params: temperature {temperature} not in (0, 1]")
    limit = request.get("max_completion_tokens") or request.get("max_tokens")
    if limit is not None and int(limit) > MINIMAX_CAP:
        out.append(f"invalid params: max tokens {limit} > {MINIMAX_CAP}")
    images = any(isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
                 for m in request.get("messages", []))
    if images and not model.lower().startswith(MINIMAX_VISION):
        out.append(f"invalid params: {model} does not accept images")
    return out


class ReasoningLLM(FakeLLM):
    def __init__(self, *, think_tokens: int = 600, separate_field: bool = False, rate_limit_every: int = 0,
                 minimax: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.think_tokens, self.separate_field, self.rate_limit_every = think_tokens, separate_field, rate_limit_every
        self.minimax = minimax
        self.rejected: list[str] = []  # why requests were refused (minimax=True)
        self.finish_reasons: list[str] = []
        self.limits: list[int | None] = []  # the token limit of every request, in arrival order

    def next_action(self, key: str, request: dict[str, Any]) -> Any:
        action = super().next_action(key, request)
        if action == "ok" and self.minimax and (why := minimax_violations(request)):
            with self._lock:
                self.rejected.extend(why)
                self.actions["400"] += 1
            return "400"
        if action == "ok" and self.rate_limit_every and len(self.requests) % self.rate_limit_every == 0:
            with self._lock:
                self.actions["429"] += 1
            return "429"
        return action

    def answer(self, request: dict[str, Any], key: str, text: str | None = None) -> dict[str, Any]:
        answer = self.reply(request, key) if text is None else text
        limit = request.get("max_completion_tokens") or request.get("max_tokens")
        self.limits.append(limit)
        step = "Let me read the chart and plan the answer step by step. "
        thinking = (step * (self.think_tokens * CHARS_PER_TOKEN // len(step) + 1))[: self.think_tokens * CHARS_PER_TOKEN]
        budget = None if limit is None else int(limit) * CHARS_PER_TOKEN
        if self.separate_field:
            reasoning, content = thinking, answer
            if budget is not None and len(reasoning) + len(content) > budget:
                reasoning, content = reasoning[:budget], content[: max(0, budget - len(reasoning))]
                finish = "length"
            else:
                finish = "stop"
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
            used = len(reasoning) + len(content)
        else:
            full = f"<think>{thinking}</think>\n{answer}"
            finish = "stop"
            if budget is not None and len(full) > budget:
                full, finish = full[:budget], "length"
            message = {"role": "assistant", "content": full}
            used = len(full)
        self.finish_reasons.append(finish)
        prompt_tokens = max(1, len(prompt_text(request)) // CHARS_PER_TOKEN)
        completion_tokens = max(1, used // CHARS_PER_TOKEN)
        return {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
                "model": request.get("model", "fake-reasoner"),
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens,
                          "completion_tokens_details": {"reasoning_tokens": min(self.think_tokens, completion_tokens)}}}
