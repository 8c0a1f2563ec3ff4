"""How many threads torch uses on a CPU worker: the host's cores, split among its CPU workers.

Left at torch's default, every CPU worker on a host claims all cores and their thread pools
thrash: two workers on two cores did half the work of one (docs/benchmarks.md, scale-out).
Torch's thread count is per calling thread, so the thread that runs the model applies it.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog
import torch

log = structlog.get_logger(__name__)


def usable_cores() -> int:
    """Return the cores this process may run on (its CPU affinity, e.g. under taskset or a cgroup)."""
    return len(os.sched_getaffinity(0))


def cpu_has_bf16_dot() -> bool:
    """Return whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 batches pay."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


class CpuThreads:
    """The thread count this worker's model threads should use; "auto" follows the host's CPU workers."""

    def __init__(self, setting: int | str, cores: int):
        omp = os.environ.get("OMP_NUM_THREADS", "")
        # An explicit setting wins, then an operator's OMP_NUM_THREADS, then the auto split.
        self.fixed = int(setting) if setting != "auto" else (int(omp) if omp.isdigit() and int(omp) > 0 else None)
        self.cores = cores
        self.wanted = self.fixed or cores

    def share_with(self, cpu_workers_on_host: int) -> None:
        """Split the cores evenly among the live CPU workers on this host (this one included)."""
        if self.fixed is None:
            self.wanted = max(1, self.cores // max(1, cpu_workers_on_host))

    def apply(self) -> None:
        """Set the calling thread's torch thread count to `wanted`, if it differs."""
        if torch.get_num_threads() != self.wanted:
            torch.set_num_threads(self.wanted)
            log.info("cpu_threads", threads=self.wanted, cores=self.cores, fixed=self.fixed is not None)
