"""How many CPUs this process may really use: affinity, capped by a cgroup CPU quota."""

from __future__ import annotations

import math
import os


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int:
    """Return the number of CPUs this process may run on, at least 1.

    That is the size of its CPU affinity mask, lowered to the cgroup CPU quota (cgroup v2
    `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`) rounded up, when a quota is set.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(cgroup_root: str, proc_cgroup: str) -> float | None:
    """Return the CPU quota (in CPUs) of this process's cgroup, or None when unlimited.

    Every directory from the hierarchy's mount point down to the process's own cgroup is
    read, and the smallest quota wins: a parent's limit binds its children. Inside a container
    the process's own cgroup is usually the mount point itself.
    """
    v2_path, v1_path = cgroup_paths(proc_cgroup, "cpu")
    quotas = [_read_v2(d) for d in lineage(cgroup_root, v2_path)] if v2_path is not None else []
    if v1_path is not None:
        for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            mount = os.path.join(cgroup_root, name)
            if os.path.isdir(mount):
                quotas += [_read_v1(d) for d in lineage(mount, v1_path)]
                break
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def cgroup_paths(proc_cgroup: str, controller: str) -> tuple[str | None, str | None]:
    """The v2 cgroup path of this process and its v1 path of `controller`, from
    /proc/self/cgroup."""
    v2 = v1 = None
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return "/", "/"
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif controller in controllers.split(","):
            v1 = path
    return v2, v1


def lineage(mount: str, path: str) -> list[str]:
    """The mount point and each directory below it down to `path`."""
    dirs = [mount]
    for part in [p for p in path.split("/") if p]:
        dirs.append(os.path.join(dirs[-1], part))
    return dirs


def _read_v2(directory: str) -> float | None:
    try:
        with open(os.path.join(directory, "cpu.max")) as f:
            fields = f.read().split()
        quota, period = int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        return None  # no file, or "max": unlimited at this level
    return quota / period if quota > 0 and period > 0 else None


def _read_v1(directory: str) -> float | None:
    try:
        with open(os.path.join(directory, "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(directory, "cpu.cfs_period_us")) as f:
            period = int(f.read())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
