"""How many CPUs this process may really use, and what they are (standard library only: the edge,
the server and the benches share it).

``os.cpu_count()`` counts the machine's CPUs, which is wrong in both places an edge or server runs:
a process pinned to some CPUs (``taskset``, Kubernetes' static CPU manager) may use only those
(``os.sched_getaffinity``), and a container with a CPU quota (``docker run --cpus 2``, a Kubernetes
CPU limit: cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``) gets only that much
time however many it sees. Thread pools sized from ``cpu_count`` on such a box oversubscribe it:
threads wait for each other and every frame's time spreads out.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_dirs(root: Path) -> list[Path]:
    """The cgroup folders of this process (v2 unified path, v1 cpu controller), then the root."""
    out: list[Path] = []
    text = _read(Path("/proc/self/cgroup")) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # v2
            out.append(root / rel)
        elif "cpu" in controllers.split(","):  # v1: /sys/fs/cgroup/cpu,cpuacct/<rel>
            for name in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
                out.append(root / name / rel)
                out.append(root / name)
    return [*out, root, root / "cpu", root / "cpu,cpuacct"]


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 2.0 for ``--cpus 2``), None when unlimited
    or unknown."""
    for d in _own_cgroup_dirs(root):
        v2 = _read(d / "cpu.max")
        if v2:  # "max 100000" (no quota) or "200000 100000" (2 CPUs)
            quota, _, period = v2.partition(" ")
            try:
                q, p = int(quota), int(period)
            except ValueError:
                return None
            return q / p if q > 0 and p > 0 else None
        q1, p1 = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if q1 is not None and p1 is not None:
            try:
                q, p = int(q1), int(p1)
            except ValueError:
                continue
            return q / p if q > 0 and p > 0 else None
    return None


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def usable_cpus(root: Path = CGROUP) -> int:
    """min(CPUs the process may run on, its cgroup quota rounded up), at least 1."""
    n = affinity_cpus()
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        n = min(n, max(1, math.ceil(limit - 1e-9)))
    return max(1, n)


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (x86 ``model name``; ARM ``Model``/``Hardware``/``CPU part``),
    else what the platform says."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and value.strip():
                fields.setdefault(key.strip(), value.strip())
        for key in ("model name", "Model", "Hardware", "cpu model"):
            if key in fields:
                return fields[key]
        if "CPU part" in fields:
            return f"{platform.machine()} (CPU implementer {fields.get('CPU implementer', '?')}, part " \
                   f"{fields['CPU part']})"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> dict[str, object]:
    """The CPU facts a benchmark records."""
    return {"cpu": cpu_model(), "online_cpus": os.cpu_count(), "affinity_cpus": affinity_cpus(),
            "cgroup_cpu_limit": cgroup_cpu_limit(), "usable_cpus": usable_cpus()}
