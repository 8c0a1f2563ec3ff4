"""CPU workers split the host's cores; torch's thread count is set in the thread that runs the model."""

from __future__ import annotations

import threading

import pytest
import torch

from services.cli import build_parser
from workers.cpu_threads import CpuThreads


def test_auto_splits_the_cores_among_the_cpu_workers_on_the_host(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = CpuThreads("auto", cores=8)
    assert threads.wanted == 8  # alone
    threads.share_with(3)
    assert threads.wanted == 2
    threads.share_with(16)
    assert threads.wanted == 1  # never zero
    threads.share_with(1)
    assert threads.wanted == 8  # the others stopped: take the cores back


def test_an_explicit_count_or_omp_num_threads_is_kept(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fixed = CpuThreads(3, cores=8)
    fixed.share_with(4)
    assert fixed.wanted == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    from_omp = CpuThreads("auto", cores=8)
    from_omp.share_with(4)
    assert from_omp.wanted == 5


def test_apply_sets_the_calling_threads_torch_count():
    before = torch.get_num_threads()
    seen = []

    def model_thread() -> None:
        threads = CpuThreads(1, cores=8)
        threads.apply()
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=model_thread)
    thread.start()
    thread.join()
    try:
        assert seen == [1]
    finally:
        torch.set_num_threads(before)  # set_num_threads also changes the default for new threads


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_cpu_threads_flag_must_be_auto_or_a_whole_number(value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--cpu-threads", value])
    assert "--cpu-threads" in capsys.readouterr().err


def test_cpu_threads_flag_is_parsed():
    assert build_parser().parse_args(["worker", "--cpu-threads", "auto"]).cpu_threads == "auto"
    assert build_parser().parse_args(["worker", "--cpu-threads", "3"]).cpu_threads == "3"
