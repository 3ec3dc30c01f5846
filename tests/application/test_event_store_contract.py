"""What the Ledger asks of its event store's recorder, on both backends: a save writes its events,
outbox rows and command record together; a save that loses the race for an aggregate version or
a command id raises IntegrityError and writes nothing; the command record keeps the save's last
position."""

from __future__ import annotations

from collections.abc import Iterator
from uuid import uuid4

import pytest
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from api.settings import Settings
from application.ledger import Ledger
from application.ports import CommandRecord
from domain.ledger import FeeSchedule
from domain.merchant import Merchant
from domain.payment import Payment
from tests.application.backends import MemoryStore, PostgresStore, Store, memory_ledger


def _merchant() -> Merchant:
    return Merchant.register(uuid4(), name="Luigi's Pizza", fee_schedule=FeeSchedule(290, 30))


def _command(command_id: str, aggregate: Merchant) -> CommandRecord:
    return CommandRecord(command_id, "register_merchant", "hash", aggregate.id, {"merchant_id": str(aggregate.id)})


class RecorderContract:
    def test_many_aggregates_load_at_once_as_each_would_alone(self, ledger: Ledger, store: Store) -> None:
        merchants = [_merchant() for _ in range(3)]
        for n, merchant in enumerate(merchants):
            merchant.change_settings(name=f"renamed {n}")
            ledger.save(merchant)
        merchants[0].deactivate("closed")
        ledger.save(merchants[0])
        wanted = [m.id for m in merchants] + [uuid4()]  # and one that does not exist
        loaded = ledger._get_many(Merchant, wanted)
        assert set(loaded) == {m.id for m in merchants}
        for merchant in merchants:
            alone = ledger.get_merchant(merchant.id)
            assert (loaded[merchant.id].version, loaded[merchant.id].name, loaded[merchant.id].active) == (
                alone.version, alone.name, alone.active)
        assert ledger._get_many(Payment, wanted) == {}  # of another class: left out

    def test_a_save_records_events_outbox_and_command_together(self, ledger: Ledger, store: Store) -> None:
        merchant = _merchant()
        recordings = ledger.save(merchant, command=_command("c-1", merchant))
        record = ledger.command_log.get_command("c-1")
        assert record is not None
        assert (record.command_name, record.request_hash, record.aggregate_id) == (
            "register_merchant", "hash", merchant.id)
        assert record.result == {"merchant_id": str(merchant.id)}
        assert record.position == recordings[-1].notification.id
        assert [e.aggregate_id for e in store.envelopes()] == [merchant.id]
        assert ledger.command_log.get_command("c-2") is None

    def test_a_lost_race_writes_nothing(self, ledger: Ledger, store: Store) -> None:
        first = _merchant()
        ledger.save(first, command=_command("c-1", first))

        second = _merchant()
        with pytest.raises(IntegrityError):  # the command id is taken
            ledger.save(second, command=_command("c-1", second))
        with pytest.raises(AggregateNotFoundError):
            ledger.repository.get(second.id)

        winner: Merchant = ledger.repository.get(first.id)
        stale: Merchant = ledger.repository.get(first.id)
        winner.deactivate("closed")
        ledger.save(winner)
        stale.deactivate("closed again")
        with pytest.raises(IntegrityError):  # the version is taken
            ledger.save(stale, command=_command("c-3", stale))
        assert ledger.command_log.get_command("c-3") is None
        assert (store.event_count(), store.command_count(), len(store.envelopes())) == (2, 1, 2)


class TestPostgreSQLRecorder(RecorderContract):
    @pytest.fixture
    def store(self, ledger: Ledger, database_url: str) -> Store:
        return PostgresStore(ledger, database_url)


class TestInMemoryRecorder(RecorderContract):
    @pytest.fixture
    def ledger(self, settings: Settings, clock: ManualClock, processor: SandboxProcessor) -> Iterator[Ledger]:
        built = memory_ledger(settings, clock, processor)
        yield built
        built.close()

    @pytest.fixture
    def store(self, ledger: Ledger) -> Store:
        return MemoryStore(ledger)
