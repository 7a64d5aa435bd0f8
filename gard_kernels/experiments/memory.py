"""Peak resident memory of one phase of a run (the profile, the training steps), on Linux.

A grid runs many runs in one process, so the process's lifetime peak (`ru_maxrss`) says nothing
about one run. Linux resets the high-water mark VmHWM to the current RSS when "5" is written to
/proc/self/clear_refs (since Linux 4.0), so the peak of a phase is VmHWM read after it, and what
the phase needed on top of what was resident before is that peak minus the RSS at its start.
Elsewhere (no /proc) the measurement is None, never a wrong number.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> Optional[int]:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Measures the peak RSS of the code run between `start()` and `stop()`.

    Attributes (after stop(); None where the platform cannot tell):
        start_mib: resident memory when the phase started.
        peak_mib: highest resident memory during the phase.
        extra_mib: peak_mib - start_mib, what the phase needed on top.
    """

    def __init__(self) -> None:
        self.start_mib = self.peak_mib = self.extra_mib = None

    def start(self) -> "PeakMemory":
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return self
        rss = _status_kib("VmRSS")
        self.start_mib = None if rss is None else rss / 1024
        return self

    def stop(self) -> "PeakMemory":
        if self.start_mib is None:
            return self
        peak = _status_kib("VmHWM")
        if peak is not None:
            self.peak_mib = peak / 1024
            self.extra_mib = self.peak_mib - self.start_mib
        return self

    def to_dict(self, prefix: str) -> dict:
        """{prefix}_peak_rss_mib and {prefix}_extra_rss_mib, rounded to 0.1 MiB."""
        def rounded(value):
            return None if value is None else round(value, 1)

        return {f"{prefix}_peak_rss_mib": rounded(self.peak_mib), f"{prefix}_extra_rss_mib": rounded(self.extra_mib)}
