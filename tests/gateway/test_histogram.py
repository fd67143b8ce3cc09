"""The consumer's latency histograms: each value counted under the first bound it does not
exceed (as Prometheus's ``le`` reads), cumulative counts, and everything past the last
bound under ``+Inf`` only."""

from __future__ import annotations

from gateway.consumer_stats import Histogram


def test_values_fall_under_the_first_bound_they_do_not_exceed() -> None:
    h = Histogram(bounds=(0.1, 1.0))
    for v in (0.0, 0.1, 0.5, 1.0, 1.5, 40.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 2), ("1", 4), ("+Inf", 6)]
    assert h.n == 6
    assert h.total == 0.0 + 0.1 + 0.5 + 1.0 + 1.5 + 40.0


def test_an_empty_histogram_reports_zeros() -> None:
    h = Histogram()
    counts = h.cumulative()
    assert counts[-1] == ("+Inf", 0)
    assert all(n == 0 for _, n in counts)
    assert len(counts) == len(h.bounds) + 1
