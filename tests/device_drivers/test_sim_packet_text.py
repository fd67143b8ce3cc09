"""The simulated radio spares bumble's per-packet debug text while nobody logs it, and writes
it whole when bumble's DEBUG logging is on."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from bumble import att, hci

import device_drivers.sim.link  # noqa: F401  (installs the spared text)


@pytest.fixture
def bumble_log() -> Iterator[logging.Logger]:
    log = logging.getLogger("bumble")
    level = log.level
    try:
        yield log
    finally:
        log.setLevel(level)


def _notification() -> att.ATT_PDU:
    return att.ATT_Handle_Value_Notification(attribute_handle=0x10, attribute_value=b"\x06\x48")


def test_without_debug_logging_a_pdus_fields_are_not_rendered(bumble_log: logging.Logger) -> None:
    bumble_log.setLevel(logging.INFO)
    text = str(_notification())
    assert "ATT_HANDLE_VALUE_NOTIFICATION" in text
    assert "attribute_handle" not in text
    assert "0648" not in text


def test_with_debug_logging_a_pdu_reads_as_bumble_writes_it(bumble_log: logging.Logger) -> None:
    bumble_log.setLevel(logging.DEBUG)
    text = str(_notification())
    assert "attribute_handle" in text
    assert "0x0010" in text
    assert "0648" in text


def _acl() -> hci.HCI_AclDataPacket:
    return hci.HCI_AclDataPacket(
        connection_handle=0x40, pb_flag=2, bc_flag=0, data_total_length=3, data=b"\x1b\x10\x00"
    )


def test_without_debug_logging_an_acl_packets_data_is_not_rendered(
    bumble_log: logging.Logger,
) -> None:
    bumble_log.setLevel(logging.INFO)
    assert str(_acl()) == "ACL: handle=0x0040, ..."


def test_with_debug_logging_an_acl_packet_reads_as_bumble_writes_it(
    bumble_log: logging.Logger,
) -> None:
    bumble_log.setLevel(logging.DEBUG)
    text = str(_acl())
    assert "handle=0x0040" in text
    assert "data=1b1000" in text


def test_bumbles_colours_are_remembered_and_unchanged() -> None:
    from bumble import colors, host

    assert host.color is colors.color  # the module the host's debug lines call it from
    assert host.color("### CONTROLLER -> HOST", "green") == (
        "\x1b[32m### CONTROLLER -> HOST\x1b[0m"
    )
    assert colors.color("x", "red", style="bold") == "\x1b[31;1mx\x1b[0m"
    with pytest.raises(colors.ColorError):
        colors.color("x", "no such colour")
