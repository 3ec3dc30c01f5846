"""The sandbox processors' test cards, chosen by the card's last four digits; one table for the
in-process sandbox (sandbox_processor.py) and the HTTP one (processor_server.py):

    4242, 4444, 1881, 0005 (and any other)  approved
    0002                                    declined: insufficient_funds
    0019                                    declined: suspected_fraud
    0119                                    timeout: the approval is recorded, but no answer comes
                                            in time; asking for the key's status gives the approval
    0259                                    (HTTP only) server error: the approval is recorded, then
                                            the answer is lost in a 500; a retry with the same key
                                            gets the recorded approval
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["DECLINES", "SERVER_ERROR_LAST4", "TIMEOUT_LAST4"]

# last four -> (reason code, message) of the decline.
DECLINES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "0002": ("insufficient_funds", "Insufficient funds"),
    "0019": ("suspected_fraud", "Suspected fraud"),
})
TIMEOUT_LAST4 = "0119"
SERVER_ERROR_LAST4 = "0259"
