-- The relay's work list: one narrow row per outbox row not yet published, written by ledger_append
-- in the same statement as the outbox row, deleted by the relay once Kafka acknowledged it
-- (adapters/kafka/relay.py). Before, the relay marked each row published_at = now(): that column
-- decided the partial index of pending rows, so the update was never HOT and rewrote the whole row
-- (envelope included) and its four index entries, the relay's largest cost (16-20 us a message,
-- against 1-2 us for deleting a narrow row). The outbox row itself is never changed again.
--
-- No foreign key to outbox: its check would lock (and so write) the outbox row inside the event
-- table's lock. Both rows are written by the one statement below, and nothing else inserts here.
-- A relay of an older version fails on the dropped column and retries with back-off until it is
-- replaced: nothing is lost, the pending rows wait.
CREATE TABLE IF NOT EXISTS outbox_pending (
    outbox_id bigint PRIMARY KEY,
    publish_attempts integer NOT NULL DEFAULT 0,
    last_error text
);

DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'outbox' AND column_name = 'published_at') THEN
        INSERT INTO outbox_pending (outbox_id, publish_attempts, last_error)
        SELECT outbox_id, publish_attempts, last_error FROM outbox WHERE published_at IS NULL
        ON CONFLICT (outbox_id) DO NOTHING;
    END IF;
END $$;
DROP INDEX IF EXISTS outbox_unpublished_idx;
ALTER TABLE outbox DROP COLUMN IF EXISTS published_at, DROP COLUMN IF EXISTS publish_attempts,
    DROP COLUMN IF EXISTS last_error;

-- ledger_append (0013) queues each outbox row in outbox_pending too. CREATE OR REPLACE resets the
-- function's attributes, so SECURITY DEFINER and its search_path (0015) are set again below; its
-- owner and grants are kept.
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
        WITH queued AS (
            INSERT INTO outbox (position, event_id, topic, message_key, envelope)
            SELECT * FROM unnest(positions, p_event_ids, p_outbox_topics, p_message_keys, p_envelopes)
            RETURNING outbox_id
        )
        INSERT INTO outbox_pending (outbox_id) SELECT outbox_id FROM queued;
        NOTIFY ledger_events;
    END IF;
    IF p_command_id IS NOT NULL THEN
        INSERT INTO command_log (command_id, command_name, request_hash, aggregate_id, result, position)
        VALUES (p_command_id, p_command_name, p_request_hash, p_aggregate_id, p_result,
                positions[cardinality(positions)]);
    END IF;
    RETURN positions;
END $$;

DO $$ BEGIN
    EXECUTE format(
        'ALTER FUNCTION ledger_append(uuid[], bigint[], text[], bytea[], uuid[], text[], text[], bytea[],'
        ' uuid[], uuid[], bytea[], text[], uuid[], integer, text, text, text, uuid, jsonb)'
        ' SECURITY DEFINER SET search_path = %I, pg_temp', current_schema());
END $$;

-- The relay (echotransact_app) reads its work list, deletes what it published and records why a
-- row failed; only ledger_append (as the owner) adds to it.
GRANT SELECT, DELETE ON outbox_pending TO echotransact_app;
GRANT UPDATE (publish_attempts, last_error) ON outbox_pending TO echotransact_app;
