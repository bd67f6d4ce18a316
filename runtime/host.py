"""What this process may use of the host: its CPU cores."""

from __future__ import annotations

import math
import os
from pathlib import Path

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup v2 CPU quota
    (a container started with ``--cpus 1.5`` gets 2), at least 1. Only the quota a container sees
    as its root (``/sys/fs/cgroup/cpu.max``) is read; one set on a nested cgroup of a host
    (systemd's ``CPUQuota``) is not."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):  # no cgroup v2 here, or a line we do not read
        pass
    return max(1, cores)
