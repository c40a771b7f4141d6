"""How busy the machine was while something was measured: load average and CPU steal.

A number measured on a loaded machine (other processes, a noisy neighbour on a virtual machine)
says so next to it, so a reader can tell a slow variant from a busy machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_PROC_STAT = Path("/proc/stat")


def _cpu_jiffies() -> tuple[int, int] | None:
    """(total, steal) CPU time since boot from the aggregate ``cpu`` line of /proc/stat; None
    where there is no /proc or the kernel does not report steal."""
    try:
        fields = _PROC_STAT.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    # user nice system idle iowait irq softirq steal (guest time is already within user/nice)
    values = [int(v) for v in fields[1:9]]
    return sum(values), values[7]


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


@dataclass(frozen=True)
class LoadProbe:
    """Started before a measurement; :meth:`finish` gives the metrics once it is done."""

    load_before: float | None
    jiffies: tuple[int, int] | None

    @classmethod
    def start(cls) -> LoadProbe:
        return cls(_loadavg(), _cpu_jiffies())

    def finish(self) -> dict[str, float | None]:
        """``load_avg_before``, ``load_avg_after`` (1-minute load averages) and ``cpu_steal``
        (fraction of all CPU time in between that the hypervisor gave to other guests; None
        where unknown)."""
        steal = None
        end = _cpu_jiffies()
        if self.jiffies is not None and end is not None and end[0] > self.jiffies[0]:
            steal = (end[1] - self.jiffies[1]) / (end[0] - self.jiffies[0])
        return {
            "load_avg_before": self.load_before,
            "load_avg_after": _loadavg(),
            "cpu_steal": steal,
        }
