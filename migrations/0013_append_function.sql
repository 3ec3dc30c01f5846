-- One round trip for a whole save (adapters/postgres/event_store.py): the command's events, their outbox
-- rows, the SMS it queues, the cards it attaches and its command record, written by one
-- statement. Called in autocommit mode, the statement is its own transaction, so the event
-- table's EXCLUSIVE lock (positions gap-free in commit order, as the eventsourcing library
-- keeps them) is taken inside the server and released by the commit that follows at once: no
-- client round trip, and no waiting on a Python thread, happens while it is held.
--
-- Work that does not need the lock (vault attachments, SMS rows) is done before it is taken.
-- A unique violation (the same aggregate version or command id saved by another writer)
-- aborts everything, as before. A vault token whose row is gone (deleted as never attached)
-- raises 'card_not_on_file' and nothing commits.
CREATE OR REPLACE FUNCTION ledger_append(
    p_originator_ids uuid[], p_versions bigint[], p_topics text[], p_states bytea[],
    p_event_ids uuid[], p_outbox_topics text[], p_message_keys text[], p_envelopes bytea[],
    p_sms_ids uuid[], p_sms_sessions uuid[], p_sms_payloads bytea[],
    p_vault_tokens text[], p_vault_payments uuid[], p_vault_required integer,
    p_command_id text, p_command_name text, p_request_hash text, p_aggregate_id uuid,
    p_result jsonb
) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    positions bigint[] := '{}';
    marked integer;
BEGIN
    IF cardinality(p_vault_tokens) > 0 THEN
        UPDATE card_vault SET attached_at = COALESCE(attached_at, now()),
                              payment_id = COALESCE(card_vault.payment_id, t.p)
          FROM unnest(p_vault_tokens, p_vault_payments) AS t(tok, p)
         WHERE card_vault.token = t.tok;
        GET DIAGNOSTICS marked = ROW_COUNT;
        IF marked < p_vault_required THEN
            RAISE EXCEPTION 'card_not_on_file';
        END IF;
    END IF;
    IF cardinality(p_sms_ids) > 0 THEN
        INSERT INTO outbox_messages (message_id, kind, aggregate_id, payload)
        SELECT m, 'sms', a, p FROM unnest(p_sms_ids, p_sms_sessions, p_sms_payloads) AS t(m, a, p)
        ON CONFLICT (message_id) DO NOTHING;
    END IF;
    IF cardinality(p_originator_ids) > 0 THEN
        LOCK TABLE ledger_events IN EXCLUSIVE MODE;
        WITH inserted AS (
            INSERT INTO ledger_events (originator_id, originator_version, topic, state)
            SELECT * FROM unnest(p_originator_ids, p_versions, p_topics, p_states)
            RETURNING originator_id, originator_version, notification_id
        )
        SELECT array_agg(i.notification_id ORDER BY d.n) INTO positions
          FROM inserted i
          JOIN unnest(p_originator_ids, p_versions) WITH ORDINALITY AS d(id, v, n)
            ON i.originator_id = d.id AND i.originator_version = d.v;
        INSERT INTO outbox (position, event_id, topic, message_key, envelope)
        SELECT * FROM unnest(positions, p_event_ids, p_outbox_topics, p_message_keys, p_envelopes);
        NOTIFY ledger_events;
    END IF;
    IF p_command_id IS NOT NULL THEN
        INSERT INTO command_log (command_id, command_name, request_hash, aggregate_id, result, position)
        VALUES (p_command_id, p_command_name, p_request_hash, p_aggregate_id, p_result,
                positions[cardinality(positions)]);
    END IF;
    RETURN positions;
END $$;
