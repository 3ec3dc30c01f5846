"""Where outbound calls to merchant-chosen URLs (webhooks, callback URLs, commerce backends) may
go: never to our own network (loopback, private, link-local such as a cloud metadata service,
multicast, reserved), unless the deployment says so (``ECHOTRANSACT_ALLOW_PRIVATE_DESTINATIONS``,
which ``echotransact run`` sets for development, where receivers run on this machine).

The check resolves the host at send time. A name that resolves to a public address here and a
private one at the moment of connecting (DNS rebinding) is not caught; an egress proxy or
firewall is the complete answer in production, this is the application's own guard.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class UnsafeDestination(ValueError):
    """The URL points into a network merchants must not reach through us."""


def _is_internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Anything not on the public internet: private, loopback, link-local (cloud metadata),
    shared (100.64/10, another cloud's metadata), reserved, multicast, and IPv4 hidden in an
    IPv6 form (mapped, 6to4, Teredo)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
        if address in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if any(v4 is not None and _is_internal(v4) for v4 in embedded):
            return True
    return not address.is_global or address.is_multicast


def check_destination(url: str, *, allow_private: bool) -> None:
    """Raise UnsafeDestination if ``url``'s host is, or resolves to, an internal address.
    A host that does not resolve passes: the call itself will fail and be retried."""
    if allow_private:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeDestination(f"not an http(s) URL with a host: {url!r}")
    host = parts.hostname
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        if host == "localhost" or host.endswith((".localhost", ".internal", ".local")):
            raise UnsafeDestination(f"{host} is an internal name")
        try:
            infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                       type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            return
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    for address in addresses:
        if _is_internal(address):
            raise UnsafeDestination(f"{host} resolves to {address}, an internal address")
