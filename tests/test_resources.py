"""A stage's wall time and peak memory: the peak is the stage's (not the process's lifetime), and a short
allocation spike inside the stage counts, by the kernel's reset high-water mark and by the sampler."""

from __future__ import annotations

import time

import pytest

from rlhf_pipeline.resources import GIB, measure_stage, reset_kernel_peak, resident_bytes, stage_resources

SPIKE = 300 * 2**20


def _spike(hold_seconds: float) -> None:
    block = b"\x01" * SPIKE  # written, so every page is resident
    time.sleep(hold_seconds)
    del block


def test_outside_a_stage_nothing_is_measured() -> None:
    assert stage_resources() is None
    with measure_stage():
        assert stage_resources() is not None
    assert stage_resources() is None


@pytest.mark.parametrize(("kernel_peak", "hold_seconds"), [(True, 0.0), (False, 0.3)])
def test_a_spike_inside_the_stage_is_its_peak_and_one_before_it_is_not(kernel_peak: bool, hold_seconds: float) -> None:
    if kernel_peak and not reset_kernel_peak():
        pytest.skip("this kernel refuses to reset the resident high-water mark")
    _spike(0.0)  # before the stage: raises the process's lifetime peak, not the stage's
    before = resident_bytes()
    with measure_stage(sample_every=0.05, kernel_peak=kernel_peak) as meter:
        assert (meter.sampler is None) == kernel_peak
        quiet = stage_resources()
        _spike(hold_seconds)  # the kernel's mark catches it at once; the sampler needs it held a few intervals
        after = stage_resources()
    assert quiet is not None and after is not None
    assert quiet["peak_rss_gib"] < (before + 0.5 * SPIKE) / GIB
    assert after["peak_rss_gib"] >= (before + 0.9 * SPIKE) / GIB
    assert resident_bytes() < before + 0.5 * SPIKE  # freed: the peak is remembered, not the current size
    assert 0 <= quiet["wall_seconds"] <= after["wall_seconds"] and after["wall_seconds"] >= hold_seconds
    assert after["peak_cuda_gib"] is None  # no GPU here
