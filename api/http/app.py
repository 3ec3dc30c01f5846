"""Builds the Litestar application from its dependencies (given by the composition root)."""

from __future__ import annotations

from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from api.http.health import Dependencies, HealthController


def create_app(deps: Dependencies) -> Litestar:
    return Litestar(
        route_handlers=[HealthController],
        dependencies={"deps": Provide(lambda: deps, use_cache=True, sync_to_thread=False)},
        openapi_config=OpenAPIConfig(title="EchoTransact", version="1"),
    )
