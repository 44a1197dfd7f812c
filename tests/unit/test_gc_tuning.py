"""A service process collects less often and never rescans what start-up allocated."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from interlock.runtime.service import GC_THRESHOLDS, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tune_gc_freezes_start_up_objects_and_raises_the_thresholds(restore_gc: None) -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 1000  # the modules and objects imported so far
    assert GC_THRESHOLDS[0] > 700  # CPython's default young threshold: the point of the change
