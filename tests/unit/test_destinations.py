"""The guard on merchant-chosen URLs (adapters/notifications/destinations.py), on literal addresses and names
that need no DNS."""

from __future__ import annotations

import pytest

from adapters.notifications.destinations import UnsafeDestination, check_destination


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000/hooks", "https://10.1.2.3/x", "http://192.168.0.10/", "http://172.16.5.5/",
    "http://169.254.169.254/latest/meta-data/",  # a cloud metadata service
    "http://[::1]/", "http://[fe80::1]/", "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/",
    "http://localhost:9000/", "http://db.internal/", "http://printer.local/", "http://224.0.0.1/",
    "ftp://example.com/", "http:///nohost",
    "http://100.100.100.200/", "http://100.64.0.1/",  # shared range, another cloud's metadata
    "http://[2002:7f00:1::]/", "http://[64:ff9b::a9fe:a9fe]/", "http://2130706433/", "http://0x7f.1/",
])
def test_internal_destinations_are_refused(url: str) -> None:
    with pytest.raises(UnsafeDestination):
        check_destination(url, allow_private=False)
    check_destination(url, allow_private=True)  # development: anything goes


@pytest.mark.parametrize("url", ["https://93.184.216.34/hooks", "http://[2606:4700::1111]/", "https://8.8.8.8:8443/x"])
def test_public_addresses_pass(url: str) -> None:
    check_destination(url, allow_private=False)


def test_a_name_that_does_not_resolve_is_left_to_the_call_itself() -> None:
    check_destination("https://no-such-host.invalid/hooks", allow_private=False)
