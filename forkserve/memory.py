"""The memory of this server: the cgroup memory it lives under, its limit (is `-w` too many
for it?) and the kernel OOM killer's count of kills there (was a worker's SIGKILL one?); and
a process's resident and proportional sizes.

cgroup v2 (`memory.max`, `memory.events`) and v1 (`memory.limit_in_bytes`,
`memory.oom_control`); the smallest limit from the hierarchy's mount point down to this
process's own cgroup binds it.
"""

from __future__ import annotations

import os

from forkserve.cpus import cgroup_paths, lineage

# Warn when the workers' resident memory takes more than this part of the limit: the rest is
# the master's, the page cache's, and what the workers grow by serving.
FIT_SHARE = 0.8
_UNLIMITED = 1 << 60  # (v1 writes "no limit" as a number near 2**63)


def memory_limit(cgroup_root: str = "/sys/fs/cgroup",
                 proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """This process's cgroup memory limit in bytes, or None when there is none."""
    limits = [_read_number(directory, "memory.max")
              for directory in _directories(cgroup_root, proc_cgroup, v2=True)]
    limits += [_read_number(directory, "memory.limit_in_bytes")
               for directory in _directories(cgroup_root, proc_cgroup, v2=False)]
    found = [limit for limit in limits if limit is not None and limit < _UNLIMITED]
    return min(found) if found else None


def oom_kills(cgroup_root: str = "/sys/fs/cgroup",
              proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """How many processes the OOM killer killed in this process's cgroup so far (its
    `oom_kill` count), or None where that cannot be read."""
    for v2, name in ((True, "memory.events"), (False, "memory.oom_control")):
        # The deepest that exists: without a cgroup namespace, a container sees its own
        # cgroup's directory at the mount point, not under its full path.
        directories = [d for d in _directories(cgroup_root, proc_cgroup, v2=v2)
                       if os.path.isfile(os.path.join(d, name))]
        if directories:
            try:
                with open(os.path.join(directories[-1], name)) as f:
                    for line in f:
                        key, _, value = line.partition(" ")
                        if key == "oom_kill":
                            return int(value)
            except (OSError, ValueError):
                pass
    return None


def check_fit(pids: list[int], workers: int) -> str:
    """`fit_warning` for `workers` workers like the processes `pids`, under this process's
    cgroup memory limit ("" without a limit)."""
    limit = memory_limit()
    if limit is None:
        return ""
    sizes = [memory_kib(pid) for pid in pids]
    return fit_warning(limit, [size[0] for size in sizes if size], workers)


def fit_warning(limit: int, rss_kib: list[int], workers: int) -> str:
    """What to tell the operator if `workers` workers of about the resident sizes `rss_kib`
    (those measured) take more than FIT_SHARE of `limit` bytes; else ""."""
    if not rss_kib:
        return ""
    each = sum(rss_kib) * 1024 / len(rss_kib)
    if workers * each <= FIT_SHARE * limit:
        return ""
    fit = max(1, int(FIT_SHARE * limit // each))
    share = FIT_SHARE * limit / fit / 2**20
    return (f"{workers} workers of about {each / 2**20:.0f} MiB each take "
            f"{workers * each / 2**20:.0f} MiB, over {FIT_SHARE:.0%} of the cgroup's memory "
            f"limit of {limit / 2**20:.0f} MiB: {fit} would fit (-w {fit}); and as workers "
            f"grow while serving, --max-worker-memory {share:.0f} recycles them before the "
            "kernel's OOM killer does")


def _directories(cgroup_root: str, proc_cgroup: str, v2: bool) -> list[str]:
    v2_path, v1_path = cgroup_paths(proc_cgroup, "memory")
    if v2:
        return lineage(cgroup_root, v2_path) if v2_path is not None else []
    mount = os.path.join(cgroup_root, "memory")
    return lineage(mount, v1_path) if v1_path is not None and os.path.isdir(mount) else []


def _read_number(directory: str, name: str) -> int | None:
    try:
        with open(os.path.join(directory, name)) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None  # no file here, or "max"


def memory_kib(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) of process `pid` in KiB, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(b":")
        if name in (b"Rss", b"Pss"):
            values[name] = int(rest.split()[0])
    return values.get(b"Rss", 0), values.get(b"Pss", 0)
