"""Telling the outside world: SMS through the outbox, signed webhooks, commerce orders, and the
guard on merchant-chosen destinations.
"""
