"""PeakMemory sees what a phase allocates, and forgets the peaks of earlier phases."""
import sys

import pytest

from gard_kernels.experiments.memory import PeakMemory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM / clear_refs are Linux's")


@linux
def test_a_phase_peak_counts_its_own_allocation_only():
    block = 200 * 1024 * 1024
    earlier = bytearray(block)  # an earlier phase's peak, freed before the phase measured
    del earlier
    quiet = PeakMemory().start()
    small = bytearray(8 * 1024 * 1024)
    quiet.stop()
    del small
    # Touched pages (bytearray zero-fills), so they are resident.
    busy = PeakMemory().start()
    big = bytearray(block)
    busy.stop()
    del big
    assert busy.extra_mib > 180, busy.to_dict("p")
    assert quiet.extra_mib < 100, f"the earlier 200 MiB peak leaked into the next phase: {quiet.to_dict('p')}"
    assert busy.peak_mib >= busy.start_mib + busy.extra_mib - 1e-6


def test_no_proc_gives_none(monkeypatch, tmp_path):
    import gard_kernels.experiments.memory as memory

    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    phase = PeakMemory().start()
    phase.stop()
    assert phase.to_dict("profile") == {"profile_peak_rss_mib": None, "profile_extra_rss_mib": None}
