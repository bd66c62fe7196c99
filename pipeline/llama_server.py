"""``python -m pipeline.llama_server ARGS`` = ``python -m llama_cpp.server ARGS``, with one fix.

On CPUs that report AMX, llama.cpp puts weights in its AMX buffer type; inside VMs that do not enable AMX
tile state (e.g. Firecracker) the first matrix multiply dies with a general protection fault (SIGSEGV at
``ldtilecfg``). Loading the model without llama.cpp's "extra" buffer types avoids that path; it only
costs some speed, which a 135M demo model does not need. ``IELTS_LLAMA_EXTRA_BUFTS=1`` keeps them.

It also dies with the process that started it (``IELTS_LLAMA_PARENT``): a stage killed by SIGTERM or
kill -9 never leaves an orphaned server behind.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _die_with_parent() -> None:
    parent = int(os.environ.get("IELTS_LLAMA_PARENT") or 0)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def _cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


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
    from llama_cpp.server.__main__ import main as serve

    serve()


if __name__ == "__main__":
    sys.exit(main())
