"""Read models built from the event stream (status, analytics, audit, balances)."""
