"""Torch's thread count fitted to the CPUs the process may use: the affinity mask, capped by the cgroup CPU
quota (v2 and v1), unless OMP_NUM_THREADS or MKL_NUM_THREADS is set. The cgroup files are fakes in a
temporary folder."""

from __future__ import annotations

import os

import pytest
import torch

from faster_diffusion.app.threads import cgroup_cpu_limit, fit_torch_threads, usable_cpus


@pytest.fixture
def cgroup(tmp_path):
    """A fake cgroup mount point and /proc/self/cgroup; ``write(relative_path, text)`` adds a file."""
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    root.mkdir()
    proc.write_text("0::/\n")

    def write(relative: str, text: str) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    write.root, write.proc = root, proc
    return write


@pytest.fixture
def restore_threads():
    """Put torch's thread count back as it was (the tests run with one thread, see conftest.py)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def limit(cgroup) -> float | None:
    return cgroup_cpu_limit(cgroup.root, cgroup.proc)


@pytest.mark.parametrize(
    ("cpu_max", "cpus"),
    [("150000 100000\n", 1.5), ("400000 100000", 4.0), ("50000 100000", 0.5), ("max 100000\n", None)],
)
def test_cgroup_v2_cpu_max_is_quota_over_period_and_max_is_no_limit(cgroup, cpu_max, cpus):
    cgroup("cpu.max", cpu_max)
    assert limit(cgroup) == cpus


@pytest.mark.parametrize(
    ("quota", "period", "cpus"),
    [("200000", "100000", 2.0), ("25000", "100000", 0.25), ("-1", "100000", None)],
)
def test_cgroup_v1_cfs_quota_over_period_and_minus_one_is_no_limit(cgroup, quota, period, cpus):
    cgroup("cpu,cpuacct/cpu.cfs_quota_us", quota + "\n")
    cgroup("cpu,cpuacct/cpu.cfs_period_us", period + "\n")
    assert limit(cgroup) == cpus


def test_cgroup_v1_mounted_as_cpu(cgroup):
    cgroup("cpu/cpu.cfs_quota_us", "300000")
    cgroup("cpu/cpu.cfs_period_us", "100000")
    assert limit(cgroup) == 3.0


def test_no_cgroup_files_or_unreadable_ones_mean_no_limit(cgroup):
    assert limit(cgroup) is None
    cgroup("cpu.max", "")
    cgroup("cpu/cpu.cfs_quota_us", "not a number")
    cgroup("cpu/cpu.cfs_period_us", "100000")
    assert limit(cgroup) is None


def test_the_process_own_v2_cgroup_and_those_above_it_count_and_the_smallest_quota_wins(cgroup):
    cgroup.proc.write_text("0::/system.slice/model.service\n")
    cgroup("system.slice/cpu.max", "200000 100000")
    cgroup("system.slice/model.service/cpu.max", "max 100000")
    cgroup("other.slice/cpu.max", "50000 100000")  # another cgroup's quota: not this process's
    assert limit(cgroup) == 2.0

    cgroup("system.slice/model.service/cpu.max", "150000 100000")
    assert limit(cgroup) == 1.5


def test_the_process_own_v1_cpu_cgroup_counts(cgroup):
    cgroup.proc.write_text("4:memory:/a\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    cgroup("cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "100000")
    cgroup("cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000")
    assert limit(cgroup) == 1.0


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "cpus"),
    [
        (8, "150000 100000", 2),  # quota 1.5 CPUs, rounded up
        (8, "max 100000", 8),  # no quota: the affinity mask
        (2, "400000 100000", 2),  # the affinity mask is smaller than the quota
        (8, "10000 100000", 1),  # a tenth of a CPU: still one thread
        (1, None, 1),
    ],
)
def test_usable_cpus_is_the_affinity_mask_capped_by_the_quota_rounded_up(cgroup, affinity, cpu_max, cpus):
    if cpu_max is not None:
        cgroup("cpu.max", cpu_max)
    assert usable_cpus(cgroup.root, cgroup.proc, affinity=affinity) == cpus


def test_usable_cpus_by_default_reads_this_process_affinity_mask(cgroup):
    assert usable_cpus(cgroup.root, cgroup.proc) == len(os.sched_getaffinity(0))


def test_fit_sets_torch_threads_to_the_usable_cpus_and_says_so(cgroup, restore_threads, capsys):
    cgroup("cpu.max", "150000 100000")
    torch.set_num_threads(1)

    assert fit_torch_threads({}, cgroup.root, cgroup.proc, affinity=16) == 2
    assert torch.get_num_threads() == 2
    assert capsys.readouterr().out == (
        "CPU threads: 2 (was 1; 16 CPUs in the affinity mask, cgroup CPU quota 1.5). "
        "Set OMP_NUM_THREADS to choose.\n"
    )


def test_fit_without_a_quota_uses_the_affinity_mask(cgroup, restore_threads, capsys):
    torch.set_num_threads(2)

    assert fit_torch_threads({"PATH": "/usr/bin"}, cgroup.root, cgroup.proc, affinity=1) == 1
    assert torch.get_num_threads() == 1
    assert "1 CPUs in the affinity mask, no cgroup CPU quota" in capsys.readouterr().out


@pytest.mark.parametrize(
    "environ",
    [{"OMP_NUM_THREADS": "3"}, {"MKL_NUM_THREADS": "3"}, {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "2"}],
)
def test_omp_or_mkl_num_threads_set_by_the_user_are_left_alone(cgroup, restore_threads, capsys, environ):
    cgroup("cpu.max", "100000 100000")
    torch.set_num_threads(3)

    assert fit_torch_threads(environ, cgroup.root, cgroup.proc, affinity=16) == 3
    assert torch.get_num_threads() == 3
    out = capsys.readouterr().out
    assert out.startswith("CPU threads: 3 (") and out.endswith(" set, so left as is)\n")
    assert all(f"{name}={value}" in out for name, value in environ.items())


def test_an_empty_omp_num_threads_does_not_count_as_set(cgroup, restore_threads):
    cgroup("cpu.max", "100000 100000")
    torch.set_num_threads(2)

    assert fit_torch_threads({"OMP_NUM_THREADS": ""}, cgroup.root, cgroup.proc, affinity=4) == 1
    assert torch.get_num_threads() == 1


def test_fit_reads_os_environ_by_default(cgroup, restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    assert fit_torch_threads(root=cgroup.root, proc_self_cgroup=cgroup.proc, affinity=8) == 1

    monkeypatch.delenv("OMP_NUM_THREADS")
    assert fit_torch_threads(root=cgroup.root, proc_self_cgroup=cgroup.proc, affinity=2) == 2
