"""The one OpenAI-compatible LLM client of the teacher and the judge.

``LLMClient(cfg)``: ``openai.AsyncOpenAI`` against ``cfg.base_url``; the key comes from the environment
variable named by ``cfg.api_key_env`` and is never logged or stored. Bounded concurrency, optional
requests-per-minute limit (aiolimiter), retries with exponential backoff + jitter on 429/5xx/timeouts/
connection errors/garbage bodies honouring ``Retry-After`` (tenacity; the openai client's own retries are
off so every retry is counted here; a 429's wait holds every request of the client, not only the retried
one), ``n=1``, ``<think>`` blocks removed, usage and cost per request, and
a budget (``cfg.budget_usd``) after which no new request is sent. Only openai/httpx errors (and garbage
bodies) are API errors; any other exception is a bug and propagates unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import functools
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlparse

from pipeline.config import LLMSection, is_reasoning, token_limit
from pipeline.errors import PipelineError
from pipeline.minimax import output_cap
from pipeline.redact import redact, register_secret_env

log = logging.getLogger("ielts_distill.llm")

_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
# OpenAI's reasoning models take max_completion_tokens and reject max_tokens
_COMPLETION_TOKENS_MODELS = re.compile(r"^(o[134]|gpt-5)", re.I)
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
# Called (awaited) right before each request is sent, in the sending task's context: the item runner checks
# there that the item's claim is still its own (pipeline.llm.runner); raising stops the request.
BEFORE_SEND: ContextVar[Callable[[], Awaitable[None]] | None] = ContextVar("before_send", default=None)
# Error codes in a 4xx body that are about the account, not the request (OpenAI, Azure, OpenRouter, MiniMax)
_ACCOUNT_CODES = re.compile(r"insufficient[_ ](quota|balance|credits?|funds)|billing|quota[_ ]exceeded|"
                            r"account[_ ](deactivated|suspended|disabled)|payment[_ ]required|credit[_ ]balance",
                            re.I)
# create()'s keyword arguments that are request options, not body fields (openai's make_request_options)
_REQUEST_OPTIONS = {"extra_headers": "headers", "extra_query": "params", "timeout": "timeout"}
IMAGE_MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}


class LLMError(PipelineError):
    """A definite answer that the request cannot succeed (a 4xx naming the request as invalid): the item's
    final record may say so (rejected / invalid, with this reason)."""


class TransientLLMError(PipelineError):
    """Retries ran out on a transient failure (connection error, timeout, 429, 5xx, garbage body): never
    final. The runner leaves the item pending for the next run. Not an LLMError, so handlers that record
    LLMError let it through."""


class FatalLLMError(PipelineError):
    """The endpoint cannot serve any item (bad key, unknown model, endpoint down): stop the whole run."""


class BudgetExceeded(PipelineError):
    """The spend reached ``budget_usd``: no new request is sent; finished records stay."""


class _BadResponse(Exception):
    """A 200 answer without a usable message (garbage body): retried like a transient error."""


@dataclass
class Completion:
    text: str  # the answer with <think>...</think> removed and whitespace trimmed
    raw_text: str  # the answer exactly as returned
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    retries: int
    seconds: float
    # the last attempt's: "stop", "length" when cut at the token limit, "abandoned" when chat's ``stop_when``
    # stopped the streamed answer (its usage then estimated: about 4 characters a token)
    finish_reason: str | None = None
    truncated: bool = False  # cut at the token limit even after one retry with twice the room
    reasoning_tokens: int = 0  # thinking a reasoning model returned separately (reasoning_content)


@dataclass
class Usage:
    """Counters of one client (one stage invocation)."""

    requests: int = 0  # HTTP attempts
    retries: int = 0
    failed: int = 0  # chat() calls that raised LLMError or TransientLLMError
    timeouts: int = 0  # attempts that timed out: the server may have finished (and billed) them
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


def strip_think(text: str) -> str:
    """Remove reasoning: ``<think>…</think>`` blocks, an unclosed ``<think>`` tail (truncated reasoning), and
    everything before a stray ``</think>`` (templates that open the block in the prompt)."""
    text = _THINK.sub("", text or "")
    low = text.lower()
    if "</think>" in low:
        text = text[low.rindex("</think>") + len("</think>"):]
    low = text.lower()
    if "<think>" in low:
        text = text[: low.index("<think>")]
    return text.strip()


def _reasoning_text(message: dict[str, Any]) -> str:
    """Reasoning an API returns beside the answer (``reasoning_content``: DeepSeek, MiniMax, vLLM;
    ``reasoning``: OpenRouter, Ollama), or ''."""
    for name in ("reasoning_content", "reasoning"):
        value = message.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


def image_mime(image_format: str | None) -> str:
    return IMAGE_MIME.get(str(image_format or "png").lower(), "image/png")


def image_data_url(data: bytes, image_format: str | None = "png") -> str:
    """The image as a base64 ``data:`` URL for an ``image_url`` content part."""
    return f"data:{image_mime(image_format)};base64,{base64.b64encode(data).decode('ascii')}"


def user_message(text: str, image_url: str | None = None) -> list[dict[str, Any]]:
    """A one-message conversation: the text, with the image after it when ``image_url`` is given."""
    if not image_url:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


def _retry_after(exc: BaseException) -> float | None:
    """Seconds from ``Retry-After`` / ``retry-after-ms`` on an HTTP error response, else None."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    name = exc.__class__.__name__
    msg = redact(str(exc).split("\n")[0])[:200]
    return f"HTTP {status} {name}: {msg}" if status else f"{name}: {msg}"


def _account_level(exc: BaseException) -> bool:
    """An answer about the account, not this request: 401, 402, 403, or an error code such as
    ``insufficient_quota`` (OpenAI sends it with a 429). Retrying or recording it as the item's failure is
    wrong: the stage stops and every item stays pending."""
    status = getattr(exc, "status_code", None)
    if status in (401, 402, 403):
        return True
    body = getattr(exc, "body", None)
    error = body.get("error", body) if isinstance(body, dict) else None
    fields = [error.get(k) for k in ("code", "type")] if isinstance(error, dict) else []
    return status is not None and 400 <= status < 500 and any(
        isinstance(f, str) and _ACCOUNT_CODES.search(f) for f in fields)


@functools.cache
def _http_libraries() -> tuple[Any, ...]:
    """The HTTP libraries openai runs on that are installed (httpx2 in recent releases, httpx before)."""
    import importlib

    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            pass
    return tuple(found)


@functools.cache
def _api_errors() -> tuple[type[BaseException], ...]:
    """What a request can fail with that is the endpoint's doing (openai's errors, the HTTP library's, a
    garbage body); anything else is a bug in the caller's code."""
    import openai

    return openai.APIError, _BadResponse, json.JSONDecodeError, *(m.HTTPError for m in _http_libraries())


class LLMClient:
    """One endpoint, one event loop. ``await chat(messages)`` -> Completion; ``usage`` holds the counters.

    ``fail_after``: after this many consecutive chat() calls that fail after all retries, the endpoint is
    taken as down and further calls raise FatalLLMError (so a dead endpoint cannot reject every item).
    """

    # A 429/5xx without Retry-After: first retry after 0.25-0.5 s, then doubling with jitter (0.5-0.75, 1-1.25,
    # 2, 4, 8 s, ... up to BACKOFF_MAX). A single transient 500 costs a quarter second, not one to two (1.0 s
    # before); an endpoint that keeps failing is still backed off within a few attempts (and fail_after stops it).
    BACKOFF_INITIAL = 0.25
    BACKOFF_MAX = 60.0
    RETRY_AFTER_MAX = 300.0  # longest Retry-After honoured
    # An answer is handed to the caller this long after it came: the requests waiting for a slot are sent
    # first. 0 (one loop turn) was not enough: answers that come together (a wave at concurrency 64) were
    # gated and written before the next requests went out (0.81-0.88 of a bare loop on 2 cores; 0.96-1.07
    # with 2-5 ms). Small beside an LLM's latency.
    ANSWER_YIELD_S = 0.005
    # A streamed answer is shown to ``stop_when`` each time it has grown by this many characters (~12 tokens):
    # a gate call costs ~1 ms of CPU, which a local server shares
    STOP_CHECK_CHARS = 48

    def __init__(self, cfg: LLMSection, *, name: str = "llm", budget_usd: float | None = None,
                 requests_per_minute: float | None = None, backoff_initial: float | None = None,
                 backoff_max: float | None = None, fail_after: int = 10):
        from aiolimiter import AsyncLimiter
        from openai import AsyncOpenAI

        self.cfg, self.name = cfg, name
        self.budget_usd = cfg.budget_usd if budget_usd is None else budget_usd
        self.backoff_initial = self.BACKOFF_INITIAL if backoff_initial is None else backoff_initial
        self.backoff_max = self.BACKOFF_MAX if backoff_max is None else backoff_max
        self.fail_after = fail_after
        self.usage = Usage()
        self._consecutive_failures = 0
        self._sem = asyncio.Semaphore(cfg.concurrency)
        # this client's share of the limit (a shard's: pipeline.llm.runner splits it across the shards)
        self.requests_per_minute = cfg.requests_per_minute if requests_per_minute is None else requests_per_minute
        # one request per 60/rpm seconds, no initial burst of a whole minute's worth
        rpm = self.requests_per_minute
        self._limiter = AsyncLimiter(1, 60 / rpm) if rpm else None
        # shared back-off: after a 429 (or any answer with Retry-After) no request of this client is sent
        # before this time.monotonic(), whichever worker it comes from
        self._not_before = 0.0
        for noisy in ("httpx", "httpx2", "httpcore", "openai"):  # one line per request otherwise
            logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))
        self._client = AsyncOpenAI(api_key=self._api_key(), base_url=cfg.base_url, timeout=cfg.timeout_s,
                                   max_retries=0)

    def _api_key(self) -> str:
        return self.api_key_for(self.cfg, self.name)

    @staticmethod
    def api_key_for(cfg: LLMSection, name: str) -> str:
        """The key from the environment variable ``cfg.api_key_env`` (one-line PipelineError when unset;
        local servers need none). Its value is masked from then on in every error line and record."""
        register_secret_env(cfg.api_key_env)
        key = os.environ.get(cfg.api_key_env or "")
        if key:
            return key
        host = urlparse(cfg.base_url or "").hostname or ""
        if cfg.embedded or host in _LOOPBACK:
            return "no-key-needed"  # llama.cpp and other local servers ignore the key
        raise PipelineError(f"{name}: environment variable {cfg.api_key_env} is not set "
                            f"(it must hold the API key for {redact(cfg.base_url)})")

    async def aclose(self) -> None:
        await self._client.close()

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.cfg.price_input_per_mtok + completion_tokens * self.cfg.price_output_per_mtok) / 1e6

    def budget_left(self) -> bool:
        return self.budget_usd is None or self.usage.cost_usd < self.budget_usd

    def check_budget(self) -> None:
        if not self.budget_left():
            raise BudgetExceeded(f"{self.name}: budget reached (${self.usage.cost_usd:.4f} spent of "
                                 f"budget_usd=${self.budget_usd:g}); no new requests sent")

    # -- one request ----------------------------------------------------------------------------------
    def _retryable(self, exc: BaseException) -> bool:
        import openai

        if isinstance(exc, (openai.APIConnectionError, _BadResponse, openai.APIResponseValidationError,
                            json.JSONDecodeError)):
            return True  # APITimeoutError is an APIConnectionError; JSONDecodeError: a garbage body
        if isinstance(exc, openai.APIStatusError):
            return (exc.status_code in (408, 409, 425, 429) or exc.status_code >= 500) and not _account_level(exc)
        return False

    def _wait(self, state) -> float:
        from tenacity import wait_exponential_jitter

        exc = state.outcome.exception()
        after = _retry_after(exc)
        if after is not None:
            wait = min(after, self.RETRY_AFTER_MAX) * (1 + random.random() * 0.1)
        else:
            wait = wait_exponential_jitter(multiplier=self.backoff_initial, max=self.backoff_max,
                                           jitter=self.backoff_initial)(state)
        if after is not None or getattr(exc, "status_code", None) == 429:  # the endpoint says: everyone wait
            self._not_before = max(self._not_before, time.monotonic() + wait)
        return wait

    async def _hold(self) -> None:
        """Wait out the shared back-off (a later 429 may push it further while we sleep)."""
        while (left := self._not_before - time.monotonic()) > 0:
            await asyncio.sleep(left)

    def _count_retry(self, state) -> None:
        self.usage.retries += 1
        log.debug("%s: retry %d after %s", self.name, state.attempt_number, _describe(state.outcome.exception()))

    async def _attempt(self, messages: list[dict[str, Any]], params: dict[str, Any],
                       stop_when: Callable[[str], Any] | None = None):
        import openai

        self.check_budget()
        async with self._sem:
            await self._hold()
            if self._limiter:
                await self._limiter.acquire()
                await self._hold()
            self.check_budget()  # again: the spend may have grown while this request waited for a slot
            if (before_send := BEFORE_SEND.get()) is not None:
                await before_send()
            self.usage.requests += 1
            try:
                resp = await self._post(messages, params, stop_when)
            except openai.APITimeoutError:
                self.usage.timeouts += 1
                raise
        choices = resp.get("choices") if isinstance(resp, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        message = choice.get("message")
        if not isinstance(message, dict) or (message.get("content") is None and choice.get("finish_reason") != "length"
                                             and not _reasoning_text(message)):
            raise _BadResponse("response has no message content")
        return resp

    async def _post(self, messages: list[dict[str, Any]], params: dict[str, Any],
                    stop_when: Callable[[str], Any] | None = None) -> Any:
        """``chat.completions.create(messages=messages, **params)`` as the request it makes (openai's
        ``post``, its documented way to send a body as given), answered as the JSON it returns: ``create``
        walks every message through its typed-parameter transform (~0.7 ms of CPU a request, no change to
        plain-dict messages) and builds pydantic models of the answer (~0.2 ms). ``extra_body`` is merged into
        the body and ``extra_headers``/``extra_query``/``timeout`` become request options, as ``create`` does.
        A body that is not JSON raises json.JSONDecodeError (a garbage body: retried). With ``stop_when`` the
        answer is streamed (:meth:`_post_streamed`)."""
        body: dict[str, Any] = {"messages": messages}
        options: dict[str, Any] = {}
        for key, value in params.items():
            if key in _REQUEST_OPTIONS:
                options[_REQUEST_OPTIONS[key]] = value
            elif key != "extra_body":
                body[key] = value
        body.update(params.get("extra_body") or {})
        if stop_when is not None:
            return await self._post_streamed(body, options, stop_when)
        return json.loads(await self._client.post("/chat/completions", body=body, options=options, cast_to=bytes))

    async def _post_streamed(self, body: dict[str, Any], options: dict[str, Any],
                             stop_when: Callable[[str], Any]) -> dict[str, Any]:
        """The answer streamed (``stream``, the usage in the last chunk), as the JSON of an answer that was not.
        ``stop_when(the raw text so far)`` is asked as the text grows; when it answers truthy the stream is
        closed (a server stops writing when its client goes: llama.cpp's does, and OpenAI-compatible APIs bill
        the tokens sent) and the answer ends there with finish_reason "abandoned" and no usage. A stream that
        breaks off or ends without a finish_reason is a garbage body (retried); a silent one times out."""
        import openai

        timeouts = tuple(m.TimeoutException for m in _http_libraries())
        broken = tuple(m.HTTPError for m in _http_libraries())
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        stream = await self._client.post("/chat/completions", body=body, options=options, cast_to=object,
                                         stream=True, stream_cls=openai.AsyncStream[dict])
        parts: list[str] = []
        thought: list[str] = []
        finish, usage, size, checked = None, None, 0, 0
        try:
            async for chunk in stream:
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    parts.append(delta.get("content") or "")
                    thought.append(_reasoning_text(delta))
                    size += len(parts[-1])
                    finish = choice.get("finish_reason") or finish
                if finish is None and size - checked >= self.STOP_CHECK_CHARS:
                    checked = size
                    if stop_when("".join(parts)):
                        finish = "abandoned"
                        break
        except timeouts as exc:
            raise openai.APITimeoutError(request=exc.request) from None
        except broken as exc:
            raise _BadResponse(f"the streamed answer broke off ({exc.__class__.__name__})") from None
        finally:
            await stream.close()
        if finish is None:
            raise _BadResponse("the streamed answer ended without a finish_reason")
        message = {"role": "assistant", "content": "".join(parts), "reasoning_content": "".join(thought)}
        return {"choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": None if finish == "abandoned" else usage}

    async def chat(self, messages: list[dict[str, Any]], *, stop_when: Callable[[str], Any] | None = None,
                   **overrides: Any) -> Completion:
        """One chat completion (n=1). Raises LLMError when the endpoint rejects the request for good (4xx),
        TransientLLMError when retries ran out on transient failures, FatalLLMError when the endpoint cannot
        work at all (401/403/404 or ``fail_after`` consecutive failures), BudgetExceeded.

        The token limit is ``max_tokens`` plus, for a reasoning model, ``reasoning_tokens``. An answer cut at the
        limit (``finish_reason: length``) is asked once more with twice the room when the thinking may have
        eaten it (a reasoning model, or nothing left of the answer); if it is still cut, ``truncated`` is set.

        ``stop_when(text so far)``: stream the answer and stop it when this says so (:meth:`_post_streamed`),
        e.g. at a quality-gate finding that more text cannot undo: the rest is neither waited for nor paid."""
        if self._consecutive_failures >= self.fail_after:
            raise FatalLLMError(f"{self.name}: endpoint {redact(self.cfg.base_url)} failing ({self._consecutive_failures} "
                                "consecutive requests failed after retries); stopped")
        limit_param = "max_completion_tokens" if _COMPLETION_TOKENS_MODELS.search(self.cfg.model or "") else "max_tokens"
        params = {"model": self.cfg.model, "temperature": self.cfg.temperature, limit_param: token_limit(self.cfg),
                  **{k: v for k, v in overrides.items() if k != "n"}, "n": 1}
        started = time.monotonic()
        done = await self._request(messages, params, stop_when)
        cut = done.finish_reason == "length"
        room = min(2 * params[limit_param], output_cap(self.cfg.model) or 2 * params[limit_param])
        if cut and limit_param not in overrides and room > params[limit_param] and (
                is_reasoning(self.cfg) or not done.text):
            # cut at the limit (a reasoning model's long thought, or a long answer): once more with twice the
            # room (within the endpoint's documented cap), then give up and say so (never an empty or half
            # answer passed off as complete)
            log.info("%s: answer cut at %d tokens; asking once more with %d", self.name, params[limit_param], room)
            again = await self._request(messages, {**params, limit_param: room}, stop_when)
            again.prompt_tokens += done.prompt_tokens
            again.completion_tokens += done.completion_tokens
            again.cost_usd += done.cost_usd
            again.retries += done.retries + 1
            done = again
        done.truncated = done.finish_reason == "length"
        done.seconds = time.monotonic() - started
        return done

    def _failed(self, retrying: Any, exc: BaseException) -> NoReturn:
        """Raise what a request that failed after its retries is: LLMError (final) or TransientLLMError."""
        self.usage.failed += 1
        self._consecutive_failures += 1
        attempts = retrying.statistics.get("attempt_number", 1)
        why = f"{_describe(exc)} (after {attempts} attempt{'s' * (attempts > 1)})"
        raise (TransientLLMError if self._retryable(exc) else LLMError)(why) from None

    async def _request(self, messages: list[dict[str, Any]], params: dict[str, Any],
                       stop_when: Callable[[str], Any] | None = None) -> Completion:
        """One request with retries (chat's errors), as a Completion."""
        import openai
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

        api_errors = _api_errors()
        retrying = AsyncRetrying(stop=stop_after_attempt(self.cfg.max_retries + 1), wait=self._wait,
                                 retry=retry_if_exception(self._retryable), before_sleep=self._count_retry,
                                 reraise=True)
        try:
            resp = await retrying(self._attempt, messages, params, stop_when)
        except BudgetExceeded:
            raise
        except openai.NotFoundError as exc:
            raise FatalLLMError(f"{self.name}: {redact(self.cfg.base_url)} refused the request ({_describe(exc)}); "
                                f"check {self.cfg.api_key_env} and model={self.cfg.model!r}") from None
        except openai.APIStatusError as exc:
            if not _account_level(exc):
                self._failed(retrying, exc)
            raise FatalLLMError(f"{self.name}: {redact(self.cfg.base_url)} refused the request ({_describe(exc)}): "
                                f"billing/authorisation: fix and rerun (check {self.cfg.api_key_env} and the "
                                "account; no item was recorded as failed)") from None
        except api_errors as exc:  # every other API failure ends this item with its reason; a bug propagates
            self._failed(retrying, exc)
        self._consecutive_failures = 0
        choice = resp["choices"][0]
        message = choice["message"]
        raw = message.get("content") or ""
        usage = resp.get("usage")
        counts = usage if isinstance(usage, dict) else {}
        p_tok, c_tok = int(counts.get("prompt_tokens") or 0), int(counts.get("completion_tokens") or 0)
        if usage is None:  # a server without usage (or an abandoned stream) still counts: ~4 chars a token
            p_tok = sum(len(str(m.get("content", ""))) for m in messages) // 4
            c_tok = len(raw) // 4
        cost = self.cost(p_tok, c_tok)
        self.usage.prompt_tokens += p_tok
        self.usage.completion_tokens += c_tok
        self.usage.cost_usd += cost
        reasoning = _reasoning_text(message)
        # the slot just freed went to a waiting request: let it go out before the caller spends CPU on this
        # answer (gate, record), so that this work overlaps the next request's latency instead of delaying it
        # (after the spend is counted: the budget check of the waiting request sees it)
        await asyncio.sleep(self.ANSWER_YIELD_S)
        return Completion(text=strip_think(raw), raw_text=raw, prompt_tokens=p_tok, completion_tokens=c_tok,
                          cost_usd=cost, retries=retrying.statistics.get("attempt_number", 1) - 1,
                          seconds=0.0, finish_reason=choice.get("finish_reason"),
                          reasoning_tokens=len(reasoning) // 4)


@dataclass
class Answer:
    """What ``ask_parsed`` got: the parsed answer (None: none usable), the raw text and the spend."""

    parsed: Any
    raw: str = ""
    attempts: int = 0
    reason: str | None = None  # why there is no parsed answer (request failed, cut at the limit)
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    cost_usd: float = 0.0


async def ask_parsed(client: LLMClient, messages: list[dict[str, Any]], parse: Callable[[str], Any], reminder: str,
                     **overrides: Any) -> Answer:
    """Ask; when ``parse`` finds nothing usable ask once more with ``reminder``. A request that fails for good
    (LLMError) or an answer cut at the token limit ends it with a reason; FatalLLMError propagates."""
    out = Answer(None)
    convo = list(messages)
    for out.attempts in (1, 2):
        try:
            done = await client.chat(convo, **overrides)
        except LLMError as exc:  # failed for good after the client's retries: keep why, never guess
            out.reason = f"request failed: {exc}"
            break
        out.usage["prompt_tokens"] += done.prompt_tokens
        out.usage["completion_tokens"] += done.completion_tokens
        out.cost_usd += done.cost_usd or 0.0
        out.raw = done.raw_text
        out.parsed = parse(done.text)
        if out.parsed:
            break
        if done.truncated:  # out of tokens (a reasoning model's thinking): a reminder cannot help
            out.reason = (f"answer cut at the token limit (finish_reason 'length', {done.completion_tokens} "
                          "tokens): raise reasoning_tokens or max_tokens")
            break
        convo = [*messages, {"role": "assistant", "content": done.text}, {"role": "user", "content": reminder}]
    return out
