"""The web console at ``/console`` for merchants, analysts, compliance and operators
(controllers.py), over the JSON API's own services, roles and row-level security."""

from api.http.console.controllers import ConsoleController
from api.http.console.web import CONSOLE_PREFIX

__all__ = ["CONSOLE_PREFIX", "ConsoleController"]
