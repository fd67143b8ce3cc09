"""The OpenAPI document stays true: schemathesis generates requests from it (valid and
invalid ones) for every operation and checks each answer against it: documented status,
content type and schema, and never a server error."""

from __future__ import annotations

import asyncio

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.web.conftest import Web

# Streams never end (checked in test_access and the browser test); signing out would end the
# session the run uses (checked in test_auth).
NOT_FUZZED = {"alert_events", "logout"}
EXAMPLES_PER_OPERATION = 12
# Schema-valid bodies may still name things that do not exist (a user's unknown site, a
# consent document of another study): those are answered 400 with the reason, which this
# check would count as refusing valid data. Every other check runs.
EXCLUDED = [positive_data_acceptance]


async def test_the_api_keeps_to_its_openapi_document(web: Web) -> None:
    document = await (await web.call("admin", "GET", "/api/v1/openapi.json")).json()
    assert document["openapi"].startswith("3.")
    schema = schemathesis.openapi.from_dict(document)
    headers = (await web.sign_in("admin")).headers()
    base_url = web.url
    await web.new_alert()

    def fuzz() -> list[str]:
        checked = []
        for result in schema.get_all_operations():
            operation = result.ok()
            op_id = operation.definition.raw["operationId"]
            if op_id in NOT_FUZZED:
                continue

            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy())
            def check(case: schemathesis.Case) -> None:
                case.call_and_validate(base_url=base_url, headers=headers, excluded_checks=EXCLUDED)

            check()
            checked.append(op_id)
        return checked

    checked = await asyncio.to_thread(fuzz)
    assert len(checked) == len(
        [op for item in document["paths"].values() for op in item.values()]
    ) - len(NOT_FUZZED)
