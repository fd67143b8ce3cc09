"""Every benchmark result says what ran it: enough to tell two machines apart when absolute
figures are compared across runs."""

from __future__ import annotations

from bench.common import calibration_ms, cpu_model, machine


def test_a_result_names_the_cpu_and_times_a_fixed_workload() -> None:
    info = machine()
    assert set(info) == {"cpus", "cpu_model", "calibration_ms", "python", "platform"}
    assert info["cpus"] >= 1
    model = cpu_model()
    assert model is None or 0 < len(model) <= 120
    first, second = calibration_ms(), calibration_ms()
    assert first > 0
    assert second > 0
