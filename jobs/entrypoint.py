#!/usr/bin/env python3
"""The command every stage image runs: ``ielts-distill stage <name>`` with the mounted run config.

The stage comes from argv[1] (the Job's args) or $IELTS_STAGE; the command from $IELTS_LAUNCHER (torchrun
when the stage runs several processes); the config from $IELTS_CONFIG (the
ConfigMap mounted at /etc/ielts-distill/config.yaml); the store from the config;
S3 credentials and API keys from the environment (Secrets). An Indexed Job's pod passes its shard through
JOB_COMPLETION_INDEX / JOB_COMPLETION_COUNT, which the stage code reads itself (pipeline.records.Shard).
The last log line says how it ended, and is also the pod's termination message:
``ielts-distill job: stage teacher shard 1/4 FAILED (exit 1): error: ...``.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

DEFAULT_CONFIG = "/etc/ielts-distill/config.yaml"
TERMINATION_LOG = os.environ.get("IELTS_TERMINATION_LOG", "/dev/termination-log")


def finish(line: str, code: int) -> int:
    print(line, flush=True)
    try:
        with open(TERMINATION_LOG, "w", encoding="utf-8") as fh:
            fh.write(line + "\n")
    except OSError:
        pass  # not in a pod (or no termination log): the log line is enough
    return code


def main(argv: list[str]) -> int:
    stage = argv[1] if len(argv) > 1 else os.environ.get("IELTS_STAGE", "")
    config = os.environ.get("IELTS_CONFIG", DEFAULT_CONFIG)
    index, count = os.environ.get("JOB_COMPLETION_INDEX"), os.environ.get("JOB_COMPLETION_COUNT")
    what = f"stage {stage or '?'}" + (f" shard {index}/{count or '?'}" if index is not None else "")
    if not stage:
        return finish("ielts-distill job: FAILED (exit 2): no stage given (argument or $IELTS_STAGE)", 2)
    if not os.path.isfile(config):
        return finish(f"ielts-distill job: {what} FAILED (exit 2): run config {config} not found "
                      "(is the ConfigMap mounted?)", 2)
    # the stage spec's launcher (rendered into the Job): torchrun starting one process per GPU, or none
    cmd = [*(shlex.split(os.environ.get("IELTS_LAUNCHER", "")) or ["ielts-distill"]), "stage", stage, "--config", config]
    print(f"ielts-distill job: {what} starting", flush=True)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace")
    for sig in (signal.SIGTERM, signal.SIGINT):  # the kubelet's SIGTERM reaches the stage, which keeps records
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    last_error = ""
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        sys.stderr.flush()
        if line.startswith("error: "):
            last_error = line.strip()
    code = proc.wait()
    if code == 0:
        return finish(f"ielts-distill job: {what} finished OK", 0)
    reason = last_error or ("killed by signal " + str(-code) if code < 0 else "see the log above")
    return finish(f"ielts-distill job: {what} FAILED (exit {code}): {reason}", code if code > 0 else 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
