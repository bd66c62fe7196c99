"""Threads for CPU-bound work: the cores idle now (pipeline/cpus.py), for llama.cpp and for torch."""

from __future__ import annotations

import os

import pytest

from pipeline import cpus


def fake_load(monkeypatch, cores: int, idle_share: float) -> None:
    samples = iter([(1000, 4000), (1000 + int(1000 * idle_share), 5000)])  # (idle, total) ticks, then +1000
    monkeypatch.setattr(cpus, "_cpu_ticks", lambda: next(samples))
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(cores)))


@pytest.mark.parametrize("cores,idle_share,threads", [(2, 1.0, 2), (2, 0.5, 1), (2, 0.0, 1), (2, 0.7, 1),
                                                       (16, 0.6, 9), (16, 1.0, 16)])
def test_threads_are_the_idle_cores(monkeypatch, cores, idle_share, threads):
    """A CPU-bound job beside us takes a core away from llama.cpp and torch (2 threads beside one such job on
    2 cores: 3 teacher answers in 12 minutes; 4.0 generated tokens/s against 9.8 with 1 thread)."""
    fake_load(monkeypatch, cores, idle_share)
    assert cpus.idle_cores(window_s=0) == threads


def test_idle_cores_reads_this_machine():
    """The real /proc/stat: at least 1, at most the cores this process may use."""
    assert 1 <= cpus.idle_cores(window_s=0.2) <= len(os.sched_getaffinity(0))


def test_torch_threads_follow_the_idle_cores_unless_omp_num_threads_chose(monkeypatch):
    import torch

    from pipeline.models.loading import cpu_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fake_load(monkeypatch, 16, 0.3)  # 5 idle of 16
    with cpu_threads(single=False):
        assert torch.get_num_threads() == 5
    assert torch.get_num_threads() == before
    with cpu_threads(single=True):
        assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # torchrun's (1 a process) or the user's choice stands
    with cpu_threads(single=False):
        assert torch.get_num_threads() == before
