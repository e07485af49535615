"""Torch's CPU thread count, fitted to the CPUs this process may actually use.

torch sizes its intra-op thread pool (OpenMP) from the machine's cores. It does not see a container's CPU
quota: a container limited to 2 CPUs on a 64-core host gets 64 threads, which the kernel throttles to 2 CPUs'
worth of time. OpenMP threads spin-wait at each parallel region's barrier for the slowest thread, so when
there are more threads than CPUs they can get, every region waits for a thread that is not running, and a run
can take many times longer than with fewer threads. :func:`fit_torch_threads` sets torch's thread count to
:func:`usable_cpus`: the CPUs in the process's affinity mask, capped by the cgroup CPU quota (v2 ``cpu.max``,
v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded up. ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``,
when set, win: the count is then left as they made it.

Neither sees other processes' load: on a machine whose cores are busy with other work, set
``OMP_NUM_THREADS`` to the cores that are free.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

#: Where the cgroup file systems are mounted.
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Which cgroup this process is in, per hierarchy.
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
#: Environment variables that set the thread count themselves; when one is set, it is left alone.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: cgroup v1 folders that can hold the cpu controller's files, relative to :data:`CGROUP_ROOT`.
_V1_CPU_FOLDERS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def _v2_quota(folder: Path) -> float | None:
    """CPUs allowed by ``folder/cpu.max`` (``"<quota> <period>"``, or ``"max <period>"``: no limit)."""
    text = _read(folder / "cpu.max")
    if not text:
        return None
    fields = text.split()
    if fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(folder: Path) -> float | None:
    """CPUs allowed by ``folder/cpu.cfs_quota_us`` over ``folder/cpu.cfs_period_us`` (quota -1: no limit)."""
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        quota_us, period_us = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _own_cgroups(proc_self_cgroup: Path) -> list[tuple[str, str]]:
    """``(controllers, path)`` for each line of ``/proc/self/cgroup`` (``id:controllers:path``)."""
    lines = (_read(proc_self_cgroup) or "").splitlines()
    return [(parts[1], parts[2]) for line in lines if len(parts := line.split(":", 2)) == 3]


def _with_ancestors(folder: Path, root: Path) -> list[Path]:
    """``folder`` and every folder above it up to ``root`` (both included); a limit anywhere applies."""
    folders = [folder]
    while folders[-1] != root and root in folders[-1].parents:
        folders.append(folders[-1].parent)
    return folders


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The CPUs the cgroup CPU quota allows this process (e.g. 1.5), or None where there is no quota.

    Read from cgroup v2's ``cpu.max`` and cgroup v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``: at the
    mount point ``root`` (in a container, its own cgroup) and in the process's own cgroup from
    ``proc_self_cgroup`` and the cgroups above it. The smallest quota found wins.
    """
    v2_folders, v1_folders = [root], [root] + [root / name for name in _V1_CPU_FOLDERS]
    for controllers, path in _own_cgroups(proc_self_cgroup):
        relative = path.lstrip("/")
        if not relative:
            continue
        if controllers == "":
            v2_folders += _with_ancestors(root / relative, root)
        elif "cpu" in controllers.split(","):
            for name in _V1_CPU_FOLDERS:
                v1_folders += _with_ancestors(root / name / relative, root / name)
    quotas = [_v2_quota(folder) for folder in v2_folders] + [_v1_quota(folder) for folder in v1_folders]
    found = [quota for quota in quotas if quota is not None]
    return min(found) if found else None


def affinity_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask; all CPUs where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def usable_cpus(
    root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP, affinity: int | None = None
) -> int:
    """The CPUs this process may use: those of its affinity mask, at most the cgroup quota rounded up, and at
    least 1.

    ``affinity`` stands in for the mask's size (by default :func:`affinity_cpus`).
    """
    cpus = affinity_cpus() if affinity is None else affinity
    return _fit(cpus, cgroup_cpu_limit(root, proc_self_cgroup))


def _fit(affinity: int, limit: float | None) -> int:
    return max(1, affinity if limit is None else min(affinity, math.ceil(limit)))


def fit_torch_threads(
    environ: Mapping[str, str] | None = None,
    root: Path = CGROUP_ROOT,
    proc_self_cgroup: Path = PROC_SELF_CGROUP,
    affinity: int | None = None,
) -> int:
    """Set torch's intra-op threads to :func:`usable_cpus`, unless ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``
    is set in ``environ`` (default ``os.environ``): then leave them as they are. Print what was chosen and
    return the thread count torch now uses."""
    import torch

    environ = os.environ if environ is None else environ
    chosen = [f"{name}={environ[name]}" for name in THREAD_ENV_VARS if environ.get(name, "").strip()]
    if chosen:
        threads = torch.get_num_threads()
        print(f"CPU threads: {threads} ({' and '.join(chosen)} set, so left as is)")
        return threads
    affinity = affinity_cpus() if affinity is None else affinity
    limit = cgroup_cpu_limit(root, proc_self_cgroup)
    threads = _fit(affinity, limit)
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    quota = "no cgroup CPU quota" if limit is None else f"cgroup CPU quota {limit:g}"
    print(
        f"CPU threads: {threads} (was {before}; {affinity} CPUs in the affinity mask, {quota}). "
        "Set OMP_NUM_THREADS to choose."
    )
    return threads
