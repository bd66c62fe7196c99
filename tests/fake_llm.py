"""A small OpenAI-compatible chat server on loopback for tests and benchmarks (real HTTP, no mocks).

It answers ``POST /v1/chat/completions`` and ``GET /v1/models`` and can misbehave on purpose:
latency, ``429`` with ``Retry-After``, ``500``, hangs past the client's timeout, garbage bodies, dropped
connections and ``<think>`` blocks. It counts requests per prompt key (by default the chart title after
``<TITLE_LAST>:`` in the teacher prompt; pass ``key_pattern`` for other prompts, e.g. the judge's).

In a test::

    with FakeLLM(latency=0.05, fault_rate=0.2) as llm:
        cfg.teacher.base_url = llm.base_url
        ...
        assert max(llm.counts.values()) == 1

``llm.script`` (a deque) forces the next actions in order: ``"429"``, ``"500"``, ``"timeout"``,
``"garbage"``, ``"drop"``, ``"cut"``/``"stall"`` (a streamed answer that breaks off halfway / goes silent
there for ``hang_s``), ``"400"``, ``"401"``, ``"402"``, ``"403"``, ``"quota429"`` (a 429 saying the
account is out of quota), ``"echo400"``/``"echo401"`` (the error quotes the request's ``Authorization``
header), ``"ok"`` or ``("reply", "text")``. ``llm.rule`` (a callable
``(key, attempt) -> action | None``) picks the action per prompt key (attempt counts from 1).
``llm.reply`` is a callable ``(request_json, key) -> str`` producing the answer text. ``llm.gate`` (a
``threading.Event``) holds every answer until it is set (at most ``hang_s``); ``llm.hold_answers_until(n)``
sets one that opens when more than ``n`` requests have arrived, e.g. to prove that two processes are both
asking when each sends at most ``n``.

A request with ``"stream": true`` is answered as server-sent events, a word a chunk, ``stream_delay`` seconds
apart, then the finish chunk, the usage chunk (``stream_options.include_usage``) and ``[DONE]``;
``llm.streams`` lists ``(chunks sent, words in the answer)`` per streamed request: a client that stops
reading is seen as the writes failing, a few chunks after it went.

Over HTTP (for a server in another process): ``GET /_stats`` returns ``{total, counts, actions}``,
``POST /_config`` with a JSON object updates ``latency``, ``fault_rate``, ``faults``, ``think``, ``retry_after``;
``POST /_reset`` forgets the counts and the window.
Standalone: ``python tests/fake_llm.py --latency 0.2`` prints ``PORT <n>`` and serves until killed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "timeout", "garbage", "drop")

ESSAY = """1. <Describe a graph>:
"The chart illustrates {what}, comparing the categories shown across the period covered by the data."

2. <Find the key points, trends and compare data>:

Paragraph 1:
"The largest category clearly dominates the chart, standing well above every other group throughout. By
contrast, the middle categories are broadly similar to one another, and the differences between them remain
modest, which suggests a fairly even spread of values across this part of the data."

Paragraph 2:
"At the other end of the scale, the smallest category accounts for only a minor share of the total. Its
figure is noticeably lower than that of its nearest neighbour, and the gap between the highest and the
lowest values is therefore considerable."

3. <Write a summary of presented data>:
"Overall, the chart reveals a clear hierarchy, with one dominant category, a cluster of similar middle
values and a small minority at the bottom of the ranking."
"""


def default_reply(request: dict[str, Any], key: str) -> str:
    """A valid structured essay of about 150 words with no figures (passes the default gates)."""
    what = re.sub(r"[\d\"]", "", key)[:80].strip() or "the data"
    return ESSAY.format(what=what.lower())


def prompt_text(request: dict[str, Any]) -> str:
    """The text of the last user message (text parts joined when the content is a list)."""
    users = [m for m in request.get("messages", []) if m.get("role") == "user"] or [{}]
    content = users[-1].get("content", "")
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")
    return str(content)


class FakeLLM:
    def __init__(self, *, latency: float = 0.0, fault_rate: float = 0.0, faults: tuple[str, ...] = FAULTS,
                 seed: int = 0, think: bool = False, retry_after: float = 0.05, hang_s: float = 5.0,
                 key_pattern: str = r'^<TITLE_LAST>: "(.*)"\s*$', reply: Callable[[dict, str], str] = default_reply,
                 host: str = "127.0.0.1", stream_delay: float = 0.0):
        self.latency, self.fault_rate, self.faults = latency, fault_rate, faults
        self.stream_delay = stream_delay
        self.streams: list[tuple[int, int]] = []  # (chunks written, words in the answer) per streamed request
        self.host = host  # another loopback address (127.0.0.2) looks like a remote endpoint: a key is needed
        self.think, self.retry_after, self.hang_s = think, retry_after, hang_s
        self.key_re = re.compile(key_pattern, re.M)
        self.reply = reply
        self.script: deque = deque()
        self.rule: Callable[[str, int], Any] | None = None
        self.gate: threading.Event | None = None  # when set to an Event: answers wait (<= hang_s) until it is set
        self.counts: Counter[str] = Counter()  # requests per prompt key (every attempt, faulty or not)
        self.actions: Counter[str] = Counter()  # what the server did
        self.requests: list[dict[str, Any]] = []  # request bodies, in arrival order
        self.auth: set[str] = set()  # Authorization headers seen
        self._rng = random.Random(seed)
        self._faults_made = 0
        self.first_at: float | None = None  # time.time() of the first request and of the last answer sent
        self.last_at: float | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, port: int = 0) -> FakeLLM:
        self._server = _Server((self.host, port), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True, name="fake-llm").start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server, "not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def hold_answers_until(self, requests: int) -> None:
        """Hold every answer (at most ``hang_s``) until more than ``requests`` requests have arrived (the rule
        runs under the server's lock, so the count is exact)."""
        self.gate = threading.Event()
        self.rule = lambda key, attempt: self.gate.set() if self.total > requests else None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        """Forget the counts and the window (one server for several benchmark runs)."""
        with self._lock:
            self.counts.clear()
            self.actions.clear()
            self.requests.clear()
            self.first_at = self.last_at = None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"total": self.total, "counts": dict(self.counts), "actions": dict(self.actions),
                    "first_request_at": self.first_at, "last_answer_at": self.last_at}

    # -- behaviour ---------------------------------------------------------------------------------
    def key_of(self, request: dict[str, Any]) -> str:
        text = prompt_text(request)
        m = self.key_re.search(text)
        return m.group(1) if m else text[-200:]

    def next_action(self, key: str, request: dict[str, Any]) -> Any:
        with self._lock:
            self.first_at = self.first_at or time.time()
            self.counts[key] += 1
            self.requests.append(request)
            ruled = self.rule(key, self.counts[key]) if self.rule else None
            if ruled is not None:
                action = ruled
            elif self.script:
                action = self.script.popleft()
            elif self.fault_rate and self._rng.random() < self.fault_rate:
                self._faults_made += 1  # round-robin over the kinds: every kind shows up
                action = self.faults[self._faults_made % len(self.faults)]
            else:
                action = "ok"
            self.actions[action if isinstance(action, str) else action[0]] += 1
            return action

    def answer(self, request: dict[str, Any], key: str, text: str | None = None) -> dict[str, Any]:
        text = self.reply(request, key) if text is None else text
        if self.think:
            text = "<think>The user wants an essay. Maybe 987,654 people? I will not say that.</think>\n" + text
        prompt = prompt_text(request)
        return {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
                "model": request.get("model", "fake"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": max(1, len(prompt) // 4), "completion_tokens": max(1, len(text) // 4),
                          "total_tokens": max(1, len(prompt) // 4) + max(1, len(text) // 4)}}


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # socketserver's default backlog of 5 drops bursts of new connections
    daemon_threads = True
    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # a client that went away is not news


def _handler(llm: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            llm.last_at = time.time()

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers=headers)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
            elif self.path == "/_stats":
                self._json(200, llm.stats())
            else:
                self._json(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/_config":
                for k, v in json.loads(body or b"{}").items():
                    setattr(llm, k, tuple(v) if k == "faults" else v)
                return self._json(200, {"ok": True})
            if self.path == "/_reset":
                llm.reset()
                return self._json(200, {"ok": True})
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._json(404, {"error": {"message": "not found"}})
            request = json.loads(body)
            if self.headers.get("Authorization"):
                llm.auth.add(self.headers["Authorization"])
            key = llm.key_of(request)
            action = llm.next_action(key, request)
            if llm.latency:
                time.sleep(llm.latency)
            if llm.gate is not None:
                llm.gate.wait(llm.hang_s)
            if action == "429":
                self._json(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                           {"Retry-After": f"{llm.retry_after:g}"})
            elif action in ("500", "400", "401", "402", "403"):
                self._json(int(action), {"error": {"message": f"fake error {action}"}})
            elif action == "quota429":
                self._json(429, {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                                           "code": "insufficient_quota"}})
            elif action in ("echo400", "echo401"):  # a server that quotes the request's key back
                self._json(int(action[4:]), {"error": {"message": f"invalid header: Authorization: "
                                                                  f"{self.headers.get('Authorization')}"}})
            elif action == "timeout":
                time.sleep(llm.hang_s)
                self.close_connection = True
            elif action == "drop":
                self.close_connection = True  # no response at all
            elif action == "garbage":
                junk = random.choice([b"<html>502 Bad Gateway</html>", b'{"choices": [', b'{"object": "nothing"}'])
                self._send(200, junk, "application/json")
            elif isinstance(action, tuple) and action[0] == "reply":
                self._answer(request, llm.answer(request, key, action[1]))
            else:
                self._answer(request, llm.answer(request, key), action if action in ("cut", "stall") else None)

        def _answer(self, request: dict[str, Any], answer: dict[str, Any], fault: str | None = None) -> None:
            if not request.get("stream"):
                return self._json(200, answer)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            choice = answer["choices"][0]
            base = {"id": answer["id"], "object": "chat.completion.chunk", "model": answer["model"]}
            # a word a chunk: the thinking (reasoning_content) first, then the answer
            deltas = [{field: w} for field in ("reasoning_content", "content")
                      for w in re.findall(r"\s*\S+", choice["message"].get(field) or "")]
            events = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
            events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]})
            if (request.get("stream_options") or {}).get("include_usage"):
                events.append({**base, "choices": [], "usage": answer["usage"]})
            if fault:  # half the words, then the connection closes (cut) or nothing more comes (stall)
                events = events[: len(deltas) // 2]
            sent = 0
            try:
                for event in [*events, *([] if fault else ["[DONE]"])]:
                    self.wfile.write(f"data: {event if event == '[DONE]' else json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                    sent += 1
                    if llm.stream_delay and sent < len(deltas):
                        time.sleep(llm.stream_delay)
                if fault == "stall":
                    time.sleep(llm.hang_s)
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                llm.streams.append((min(sent, len(deltas)), len(deltas)))
                llm.last_at = time.time()

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    args = parser.parse_args()
    llm = FakeLLM(latency=args.latency, fault_rate=args.fault_rate).start(args.port)
    print(f"PORT {llm.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        llm.stop()


if __name__ == "__main__":
    sys.exit(main())
