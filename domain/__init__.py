"""The pure core of EchoTransact: money, ledger postings and the aggregates.

Imports only the standard library and ``eventsourcing.domain``.
"""
