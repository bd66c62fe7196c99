"""How many threads a CPU-bound step should use: the cores idle right now.

llama.cpp's threads and torch's OpenMP threads wait for each other at every operation, so one thread on a
core that another job keeps busy stalls all of them. Measured on 2 cores beside one CPU-bound job: llama.cpp
with 2 threads answered 3 teacher requests in 12 minutes, and the student generated 4.0 tokens/s with 2 torch
threads against 9.8 with 1 (idle: 12.8 with 2, 10.8 with 1).
"""

from __future__ import annotations

import os
import time


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)


def idle_cores(window_s: float = 0.5) -> int:
    """How many of this process's cores were idle over the last ``window_s`` seconds (/proc/stat), at least 1.
    Without /proc/stat: half the cores."""
    cores = usable_cores()
    try:
        idle0, total0 = _cpu_ticks()
        time.sleep(window_s)
        idle1, total1 = _cpu_ticks()
    except (OSError, ValueError):
        return max(1, cores // 2)
    share = (idle1 - idle0) / max(1, total1 - total0)
    return max(1, min(cores, int(share * cores + 0.25)))


def _cpu_ticks() -> tuple[int, int]:
    """(idle, total) clock ticks of all CPUs since boot, from /proc/stat's first line."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, *rest = (int(x) for x in f.readline().split()[1:9])
    return idle + iowait, user + nice + system + idle + iowait + sum(rest)
