"""`bench login-flood` end to end with tiny windows: a real gateway, a private Mosquitto and a
scratch database; the flood really happens (every attempt answered or timed out, 429s only
where the gateway's own limits hold) and the result has what docs/performance.md reads from
it. No timing is asserted."""

from __future__ import annotations

from bench import login_flood
from storage.users import DEFAULT_HASHER
from tests.fixtures.postgres import PgServer

FLOOD_RATE = 20.0
SECONDS = 2.0


async def test_a_tiny_flood_is_answered_and_reported_beside_two_baselines(
    pg_server: PgServer,
) -> None:
    result = await login_flood.run(
        pg_server.admin_url,
        rate=40.0,
        size=10,
        seconds=SECONDS,
        flood_rate=FLOOD_RATE,
        flood_timeout_s=5.0,
        workers=1,
        hubs=4,
    )

    assert result["benchmark"] == "login-flood"
    assert {"machine", "postgresql", "method", "argon2", "limits", "targets"} <= result.keys()
    assert set(result["windows"]) == {"baseline_1", "limited", "unlimited", "baseline_2"}
    for name, w in result["windows"].items():
        assert w["envelopes_published"] > 0, name
        assert w["receipts"] == w["envelopes_published"], name
        assert w["receipts_per_s"] > 0, name
        assert w["latency_ms"]["p50"] is not None, name
        assert w["latency_ms"]["p99"] is not None, name
        assert w["cpu"]["consumer_cores"] is not None, name
        assert (w["flood"] is None) == name.startswith("baseline"), name

    for kind in ("limited", "unlimited"):
        flood = result["windows"][kind]["flood"]
        assert flood["kind"] == kind
        # 20/s over 2 s: more than the 20 a worker lets one address try at once.
        assert flood["attempts"] >= FLOOD_RATE * SECONDS * 0.9
        statuses = flood["statuses"]
        assert sum(statuses.values()) == flood["attempts"]
        assert set(statuses) <= {"401", "429", "timeout"}
        assert statuses.get("401", 0) > 0
        # Every 401 is an unknown name verified against the dummy hash: one hash each.
        assert flood["hashes"]["until_every_attempt_answered"] >= statuses["401"]
        # How many of them fell inside the window is timing: on a loaded machine, none may.
        assert 0 <= flood["hashes"]["in_window"] <= flood["hashes"]["until_every_attempt_answered"]

    limited = result["windows"]["limited"]["flood"]["statuses"]
    assert limited.get("429", 0) > 0
    assert limited.get("401", 0) + limited.get("429", 0) + limited.get("timeout", 0) == sum(
        limited.values()
    )
    # Raised limits: no attempt is refused before its hash.
    assert "429" not in result["windows"]["unlimited"]["flood"]["statuses"]

    summary = result["summary"]
    assert len(summary["baseline"]["receipts_per_s_windows"]) == 2
    assert summary["baseline"]["noise"] is not None
    for kind in ("limited", "unlimited"):
        verdict = summary[kind]
        assert verdict["throughput_ratio"] is not None
        assert verdict["p99_ms"] is not None
        assert isinstance(verdict["met_targets"], bool)
        assert result["met_targets"][kind] is verdict["met_targets"]
    assert result["argon2"]["memory_cost_kib"] == DEFAULT_HASHER.memory_cost
