-- Customers' data keys (crypto-shredding; application/privacy.py, adapters/postgres/customer_keys.py).
-- Personal data in events (phone, metadata, IP address, user agent) is sealed under a per-customer
-- AES-GCM key; the key is kept here wrapped under the master key (derived from the hash key), found
-- through a keyed hash of the phone. Erasure sets wrapped_key and lookup_hash to NULL: what the key
-- sealed can no longer be opened, and nothing links the pseudonym (customer_id) to a phone.
CREATE TABLE IF NOT EXISTS customer_keys (
    key_id uuid PRIMARY KEY,
    customer_id uuid NOT NULL,             -- the pseudonym events and read models carry
    lookup_hash text UNIQUE,               -- keyed hash of the phone; NULL once erased
    wrapped_key bytea,                     -- nonce + AES-GCM(master key, data key); NULL once erased
    created_at timestamptz NOT NULL DEFAULT now(),
    erased_at timestamptz,
    CHECK ((erased_at IS NULL) = (wrapped_key IS NOT NULL)),
    CHECK (erased_at IS NULL OR lookup_hash IS NULL)
);
CREATE INDEX IF NOT EXISTS customer_keys_customer_idx ON customer_keys (customer_id);

-- The sessions that sealed personal data under a customer's key: what an erasure scrubs (their
-- queued SMS) and what a subject access export lists. Written before the session's save, so a
-- saved session is always here (a session whose save then failed is harmless here).
CREATE TABLE IF NOT EXISTS customer_sessions (
    customer_id uuid NOT NULL,
    session_id uuid NOT NULL,
    key_id uuid NOT NULL,
    PRIMARY KEY (customer_id, session_id)
);

-- The status read model keeps the pseudonym; customer_phone_masked is derived at projection time
-- from the sealed phone while its key exists, else 'erased' (projections/status.py).
ALTER TABLE session_status ADD COLUMN IF NOT EXISTS customer_id uuid;
CREATE INDEX IF NOT EXISTS session_status_customer_idx ON session_status (customer_id);

-- The application reads and makes keys and destroys them (UPDATE); nobody else reads them: not the
-- read role (merchants, analysts, compliance), which never sees a key.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'echotransact_app') THEN
        GRANT SELECT, INSERT, UPDATE ON customer_keys TO echotransact_app;
        GRANT SELECT, INSERT ON customer_sessions TO echotransact_app;
    END IF;
END
$$;

-- The read role opens the IP address and user agent of a dispute's evidence pack (projections/
-- evidence.py): it may read a key's id and its wrapped form, which only a process holding the master
-- key can unwrap; never the pseudonym or the lookup hash.
GRANT SELECT (key_id, wrapped_key) ON customer_keys TO echotransact_reader;
