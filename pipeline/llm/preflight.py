"""Before paying or deleting anything: can this endpoint be used at all? (A stage's ``check(ctx)``.)"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from pipeline.config import LLMSection
from pipeline.errors import PipelineError
from pipeline.redact import redact


def check_endpoint(cfg: LLMSection, name: str, timeout_s: float = 10.0) -> None:
    """One line (PipelineError) when the endpoint cannot work: the key variable unset, the endpoint not
    answering within ``timeout_s``, or refusing the key (401/403 on ``GET /models``). Any other answer counts
    as reachable (some providers have no ``/models``). An embedded server: llama-cpp-python and the GGUF."""
    if cfg.embedded:
        from pipeline.llm.server import find_gguf

        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise PipelineError(f"{name}: embedded LLM needs llama-cpp-python (pip install "
                                "'llama-cpp-python[server]'; see docs/teacher.md)") from None
        find_gguf(cfg)
        return
    from pipeline.llm.client import LLMClient

    key = LLMClient.api_key_for(cfg, name)
    url = f"{(cfg.base_url or '').rstrip('/')}/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    where = redact(cfg.base_url or "")
    try:
        with urllib.request.urlopen(request, timeout=min(timeout_s, cfg.timeout_s)):  # noqa: S310 - config URL
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            body = redact(exc.read(300).decode("utf-8", "replace").replace("\n", " "))
            raise PipelineError(f"{name}: {where} refused the key in {cfg.api_key_env} (HTTP {exc.code}: "
                                f"{body[:160]}); nothing was sent or deleted") from None
        return  # reachable; this provider just has no /models (or answers it oddly)
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        why = redact(str(getattr(exc, "reason", exc)))
        raise PipelineError(f"{name}: endpoint {where} not reachable ({why}); nothing was sent or "
                            "deleted") from None
