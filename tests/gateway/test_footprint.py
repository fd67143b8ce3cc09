"""What a gateway worker loads: pyarrow (about 50 MB resident) only once it needs it."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import sys
import gateway.app
from ingest import rules
from storage.exports import export

series = rules.Series.of(list(range(1, 11)), [70.0] * 10)
rule = rules.Rule(1, "S", "hr", "heart_rate", high=120.0)
rules.evaluate(rule, rules.RuleState(), series, "P1")
print("pyarrow" in sys.modules)
long = rules.Series.of(list(range(1, rules.VECTOR_MIN + 1)), [70.0] * rules.VECTOR_MIN)
rules.evaluate(rule, rules.RuleState(), long, "P1")
print("pyarrow" in sys.modules)
"""


def test_a_worker_loads_pyarrow_only_for_a_long_series_or_a_parquet_export() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert out == ["False", "True"], out
