"""A development identity verifier with documented test identities, behind the same port a
real identity provider would implement.

    date of birth 1990-01-01 with any postal code      verified
    date of birth 1970-01-01                            rejected: identity_mismatch
    anything else                                       verified when the postal code has 3-10
                                                        letters/digits and the date is a real
                                                        date at least 18 years ago
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

from application.ports import IdentityClaim, IdentityOutcome

NAME = "dev-identity"
POSTAL = re.compile(r"[A-Za-z0-9 -]{3,10}")


class DevIdentityVerifier:
    def verify(self, *, phone: str, claim: IdentityClaim) -> IdentityOutcome:
        try:
            born = date.fromisoformat(claim.date_of_birth)
        except ValueError:
            return IdentityOutcome(False, NAME, "invalid_date_of_birth")
        if claim.date_of_birth == "1970-01-01":
            return IdentityOutcome(False, NAME, "identity_mismatch")
        if claim.date_of_birth == "1990-01-01":
            return IdentityOutcome(True, NAME)
        today = datetime.now(UTC).date()
        age = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
        if age < 18:
            return IdentityOutcome(False, NAME, "under_age")
        if not POSTAL.fullmatch(claim.postal_code or ""):
            return IdentityOutcome(False, NAME, "invalid_postal_code")
        return IdentityOutcome(True, NAME)
