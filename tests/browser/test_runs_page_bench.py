"""The console bench's runs-page measurement works end to end (small sizes; the figure itself is
``python -m bench.console_bench``'s)."""

from __future__ import annotations

import pytest

from bench.console_bench import measure_runs_page

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_the_runs_page_bench_seeds_the_projection_and_times_real_page_loads() -> None:
    result = await measure_runs_page(runs=120, samples=3)
    assert result["runs_in_projection"] == 120
    assert result["runs"]["rows"] == 50, "the first page shows 50 of the seeded runs"
    assert result["runs_filtered"]["rows"] == 12, "every tenth seeded run is cancelled"
    assert result["runs_search"]["rows"] == 1, "an idempotency key finds its one run"
    assert result["runs_page2"]["rows"] == 50
    assert result["runs"]["count"] == 3 and result["p50_ms"] > 0
