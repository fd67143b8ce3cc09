"""A study's settings, each changed the one way: one column of ``studies``, audited with its
new value (the audit actions are stable names), or :class:`UnknownStudy`."""

from __future__ import annotations

from enum import StrEnum

from psycopg import sql

from storage import audit
from storage.db import Conn
from storage.errors import UnknownStudy


class StudySetting(StrEnum):
    """The settings changed after a study is created (the ``studies`` column of each)."""

    ALERT_ESCALATION_S = "alert_escalation_s"
    ALERTS_ON_DOUBTFUL = "alerts_on_doubtful"
    ORIGINALS_RETENTION_DAYS = "originals_retention_days"
    LATE_DATA_POLICY = "late_data_policy"


# The audit action of each: stable, they are what auditors search for.
_ACTIONS: dict[StudySetting, str] = {
    StudySetting.ALERT_ESCALATION_S: "study.alert_escalation_set",
    StudySetting.ALERTS_ON_DOUBTFUL: "study.alerts_on_doubtful_set",
    StudySetting.ORIGINALS_RETENTION_DAYS: "study.originals_retention_set",
    StudySetting.LATE_DATA_POLICY: "study.late_data_policy_set",
}


async def set_study_setting(
    conn: Conn, study_id: str, setting: StudySetting, value: object, *, actor: str
) -> None:
    """Set ``setting`` of ``study_id`` to ``value`` (None clears it), in one transaction
    with its audit record."""
    statement = sql.SQL("UPDATE studies SET {} = %s WHERE study_id = %s").format(
        sql.Identifier(setting.value)
    )
    async with conn.transaction():
        cur = await conn.execute(statement, (value, study_id))
        if cur.rowcount != 1:
            raise UnknownStudy(f"no study {study_id!r}")
        await audit.append(
            conn,
            actor=actor,
            action=_ACTIONS[setting],
            entity="study",
            entity_id=study_id,
            detail={setting.value: value},
        )
