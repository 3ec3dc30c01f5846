from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from uuid import uuid4

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings as hsettings, Phase
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup, Failure
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.api.conftest import Api, make_api


@pytest.fixture
def unlimited_api(settings, database_url, servers, clock, processor) -> Iterator[Api]:
    yield from make_api(dataclasses.replace(settings, rate_limit_per_minute=0), database_url, servers, clock, processor)


def test_fuzz(unlimited_api):
    api = unlimited_api
    schema = schemathesis.openapi.from_url(api.url + "/schema/openapi.json")
    found = {}
    counts = {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            t0 = time.monotonic()
            n = [0]
            @given(case=op.as_strategy(mode))
            @hsettings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate], database=None)
            def run(case):
                if isinstance(case.query, dict) and isinstance(case.query.get("wait_for_position"), int):
                    case.query.pop("wait_for_position")
                for caller in ("a", "admin"):
                    headers = {"Authorization": f"Bearer {api.keys[caller]}"}
                    if case.method.upper() in ("POST", "PATCH"):
                        headers["Idempotency-Key"] = uuid4().hex
                    response = case.call(base_url=api.url, headers=headers)
                    n[0] += 1
                    try:
                        case.validate_response(response, )
                    except FailureGroup as g:
                        for f in g.exceptions:
                            key = (op.label, f.title)
                            if key not in found:
                                found[key] = (mode, caller, case.method, case.formatted_path, case.query, case.body, response.status_code, response.headers.get("content-type"), response.text[:300], f.message[:600])
                    except Failure as f:
                        key = (op.label, f.title)
                        if key not in found:
                            found[key] = (mode, caller, case.method, case.formatted_path, case.query, case.body, response.status_code, response.headers.get("content-type"), response.text[:300], f.message[:600])
            try:
                run()
            except Exception as e:
                found[(op.label, mode, "ERR")] = repr(e)[:500]
            counts[(op.label, mode)] = (n[0], round(time.monotonic() - t0, 1))
    for k, v in counts.items():
        print("COUNT", k, v)
    for k, v in found.items():
        print("FOUND", k, v)
