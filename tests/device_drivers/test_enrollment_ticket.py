"""The enrollment code a hub reads from the site's QR code: what the gateway writes, the hub
reads back; every malformed or unsafe code is refused before anything is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_drivers.identity import (
    EnrollmentTicket,
    HubIdentityError,
    checked_ticket,
    parse_enrollment,
)
from gateway import enrollment
from gateway.pki import StudyCA

CODE = "ABCD-EFGH-JKMN-PQRS"
PIN = "ab" * 32


def test_what_the_gateway_writes_the_hub_reads(tmp_path: Path) -> None:
    ca = StudyCA.load_or_create(tmp_path / "ca")
    uri = enrollment.enrollment_uri("https://trial.example.org/", CODE, ca)
    assert parse_enrollment(uri) == EnrollmentTicket(
        "https://trial.example.org", CODE, enrollment.ca_sha256(ca)
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (
            "trialstream:enroll?gateway=http://trial.example.org&code=" + CODE + "&ca=" + PIN,
            "plain http",
        ),
        (
            "trialstream:enroll?gateway=https://trial.example.org&code=" + CODE,
            "does not name the study CA",
        ),
        (
            "trialstream:enroll?gateway=https://trial.example.org&code=" + CODE + "&ca=abc",
            "not a SHA-256",
        ),
        (
            "trialstream:enroll?gateway=https://u:p@trial.example.org&code=" + CODE + "&ca=" + PIN,
            "https://host",
        ),
        (
            "trialstream:enroll?gateway=https://trial.example.org:99999&code="
            + CODE
            + "&ca="
            + PIN,
            "not a URL",
        ),
        (
            "trialstream:enroll?gateway=ftp://trial.example.org&code=" + CODE + "&ca=" + PIN,
            "https://host",
        ),
        (
            "trialstream:enroll?gateway=https://trial.example.org&code=AB%00CD&ca=" + PIN,
            "malformed",
        ),
        ("trialstream:enroll?gateway=https://a&gateway=https://b&code=" + CODE, "one gateway"),
        ("trialstream:enroll?code=" + CODE, "one gateway"),
        ("https://trial.example.org/?code=" + CODE, "must start with"),
        ("trialstream:enroll?gateway=https://x&code=" + CODE + "&ca=" + PIN + "\n", "printable"),
        ("trialstream:enroll?gateway=https://x&code=" + "A" * 2000, "too long"),
        ("trialstream:enroll?gateway=https://tr\u00efal.example&code=" + CODE, "printable ASCII"),
        (
            "trialstream:enroll?gateway=https://x&code=" + CODE + "&ca=" + PIN + "&x=1&y=2",
            "not an enrollment",
        ),
    ],
    ids=[
        "plain-http",
        "no-ca",
        "short-ca",
        "userinfo",
        "bad-port",
        "not-https",
        "nul-in-code",
        "two-gateways",
        "no-gateway",
        "not-the-scheme",
        "newline",
        "overlong",
        "non-ascii",
        "too-many-fields",
    ],
)
def test_a_malformed_or_unsafe_code_is_refused(text: str, why: str) -> None:
    with pytest.raises(HubIdentityError, match=why):
        parse_enrollment(text)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.8.9.10"])
def test_plain_http_and_no_pin_only_on_this_machine(host: str) -> None:
    assert checked_ticket(f"http://{host}:8080/", CODE, None).gateway_url == f"http://{host}:8080"


def test_a_pin_is_taken_with_its_prefix_and_in_either_case() -> None:
    assert checked_ticket("https://x.org", CODE, "sha256:" + PIN.upper()).ca_sha256 == PIN
