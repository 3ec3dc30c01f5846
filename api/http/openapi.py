"""What the OpenAPI document says each operation answers: its success shape and the problems."""

from __future__ import annotations

from typing import Any

from litestar.openapi.datastructures import ResponseSpec

from api.http.problems import PROBLEM_JSON, TITLES
from api.http.schemas import Problem

PROBLEM_STATUSES = (400, 401, 403, 404, 409, 422, 429)


def problems(*statuses: int) -> dict[int, ResponseSpec]:
    return {
        status: ResponseSpec(data_container=Problem, media_type=PROBLEM_JSON,
                             description=f"{TITLES.get(status, 'Error')} (problem+json with a stable code)")
        for status in statuses or PROBLEM_STATUSES
    }


def command(status: int, data: Any, description: str) -> dict[int, ResponseSpec]:
    """A command: its success body (sent as bytes, so Litestar cannot infer it) and its problems;
    402 and 503 when a processor is involved are added by the caller."""
    return {status: ResponseSpec(data_container=data, description=description), **problems()}


PROCESSOR_PROBLEMS = problems(402, 503)
