"""Other processes' CPU use during a window. A CPU energy counter (RAPL) reads the whole package, every
process's work in it, and on a CPU other processes share the cores the model runs on; so a window during which
they kept the CPUs busy is flagged, never passed off as the model's own figure. The host's busy time comes from
/proc/stat, this process's from its own CPU clock; where /proc/stat cannot be read (macOS, Windows) nothing is
said."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

STAT = Path("/proc/stat")
OTHERS_FLAG_CPUS = 0.5  # other processes' average use over a window, in CPUs, from which the window is flagged
# /proc/stat's "cpu" line: user nice system idle iowait irq softirq steal guest guest_nice, in clock ticks;
# guest time is inside user already. Idle and iowait are not busy; steal is (the hypervisor ran another guest on
# this one's CPUs, which slows the window as another process would).
_IDLE = (3, 4)
_COUNTED = 8  # user .. steal


def busy_seconds(stat: Path = STAT) -> float | None:
    """CPU-seconds the host's CPUs have been busy since boot (all CPUs summed), or None where unreadable."""
    try:
        line = stat.read_text().splitlines()[0].split()
        ticks = [int(v) for v in line[1 : 1 + _COUNTED]]
    except (OSError, IndexError, ValueError):
        return None
    if line[0] != "cpu" or len(ticks) < 4:
        return None
    return sum(t for i, t in enumerate(ticks) if i not in _IDLE) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuUse:
    """CPU use over one window, in CPUs (1.0: one CPU busy the whole window)."""

    seconds: float
    host_cpus: float  # every process's, this one's included
    own_cpus: float

    @property
    def other_cpus(self) -> float:
        return max(0.0, self.host_cpus - self.own_cpus)

    def flag(self, during: str = "the window") -> str | None:
        """The flag of a window (``during`` names it) when other processes kept OTHERS_FLAG_CPUS or more busy."""
        if self.other_cpus < OTHERS_FLAG_CPUS:
            return None
        return (f"other processes kept {self.other_cpus:.2f} CPUs busy during {during} (this one "
                f"{self.own_cpus:.2f}): a CPU energy counter counts their work, and on a CPU they shared its cores; "
                "measure on an idle host")


class CpuShare:
    """Begin/end around a window: the host's busy time (``stat``) and this process's CPU time at each edge. The
    window's length is its meter's (``end(seconds)``): one window, one clock."""

    def __init__(self, stat: Path = STAT) -> None:
        self.stat = stat
        self._begin: tuple[float, float] | None = None

    def begin(self) -> None:
        host = busy_seconds(self.stat)
        self._begin = None if host is None else (host, time.process_time())

    def end(self, seconds: float) -> CpuUse | None:
        """The use over a window of ``seconds``, or None when /proc/stat was unreadable at either edge or the
        window took no time."""
        host = busy_seconds(self.stat)
        if self._begin is None or host is None or not seconds > 0:
            return None
        host0, own0 = self._begin
        return CpuUse(seconds, (host - host0) / seconds, (time.process_time() - own0) / seconds)
