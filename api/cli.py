"""The ``echotransact`` command line: run the system, apply migrations."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from api.bootstrap import ENV_VARS, ConfigurationError, Settings, development_keys
from api.logging import configure_logging


def _settings(data_dir: Path, dev_keys: bool) -> Settings:
    environ = dict(os.environ)
    environ.setdefault("ECHOTRANSACT_DATA_DIR", str(data_dir))
    if dev_keys:
        for key, value in development_keys(data_dir).items():
            environ.setdefault(key, value)
    return Settings.from_env(environ)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class Terminated(SystemExit):
    """SIGTERM, turned into an exception so every ``finally`` runs and servers are stopped."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(0)


def cmd_run(args: argparse.Namespace) -> int:
    import uvicorn

    from adapters.servers import LocalServers, free_port
    from api.http.app import create_app
    from api.http.health import Dependencies
    from migrations import migrate

    data_dir = Path(os.environ.get("ECHOTRANSACT_DATA_DIR", ".data")).resolve()
    settings = _settings(data_dir, dev_keys=True)
    configure_logging(settings.log_level)
    log = structlog.get_logger("echotransact")
    port = settings.port or free_port(settings.host)
    if not _port_free(settings.host, port):
        raise ConfigurationError(
            f"port {port} on {settings.host} is in use; set ECHOTRANSACT_PORT to another (0 = any free)"
        )
    servers = LocalServers.from_env(data_dir, persistent=True)
    # uvicorn restores this handler and re-raises the signal after its graceful shutdown.
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        urls = servers.start()
        applied = migrate(urls.database_url)
        log.info("migrations_applied", applied=[f"{m.version:04d}_{m.name}" for m in applied])
        app = create_app(Dependencies(urls.database_url, urls.redis_url, urls.kafka_bootstrap_servers))
        print(f"EchoTransact serving on http://{settings.host}:{port}", flush=True)
        uvicorn.Server(
            uvicorn.Config(app, host=settings.host, port=port, log_config=None, access_log=False)
        ).run()
    finally:
        servers.stop()
        log.info("stopped")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from adapters.servers import LocalServers
    from migrations import migrate

    data_dir = Path(os.environ.get("ECHOTRANSACT_DATA_DIR", ".data")).resolve()
    with LocalServers.from_env(data_dir, persistent=True) as urls:
        applied = migrate(urls.database_url)
    print(f"applied {len(applied)} migration(s)" + "".join(f"\n  {m.version:04d}_{m.name}" for m in applied))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="echotransact",
        description="Event-sourced payment ledger for voice commerce.",
        epilog="environment:\n" + "\n".join(f"  {k:34} {v}" for k, v in ENV_VARS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start the servers (embedded unless configured), migrate, serve the API")
    sub.add_parser("migrate", help="apply database migrations (safe to re-run)")
    args = parser.parse_args(argv)
    handlers = {"run": cmd_run, "migrate": cmd_migrate}
    try:
        return handlers[args.command](args)
    except (ConfigurationError, OSError) as error:
        print(f"echotransact: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
