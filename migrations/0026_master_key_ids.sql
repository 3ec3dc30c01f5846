-- Which master key wrapped each customer's data key (adapters/personal_data.py MasterKeys). The
-- master key is its own setting (ECHOTRANSACT_MASTER_KEY) now; keys wrapped before this migration
-- were wrapped under a key derived from the hash key, named 'derived-from-hash-key' here, and are
-- moved to the configured master key by `echotransact customers rewrap`.
ALTER TABLE customer_keys ADD COLUMN IF NOT EXISTS master_key_id text;
UPDATE customer_keys SET master_key_id = 'derived-from-hash-key'
WHERE master_key_id IS NULL AND wrapped_key IS NOT NULL;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'customer_keys_master_key_named') THEN
        ALTER TABLE customer_keys ADD CONSTRAINT customer_keys_master_key_named
            CHECK (wrapped_key IS NULL OR master_key_id IS NOT NULL);
    END IF;
END
$$;

-- What a rotation waits on: the live keys not yet under the current master key.
CREATE INDEX IF NOT EXISTS customer_keys_master_key_idx ON customer_keys (master_key_id)
    WHERE wrapped_key IS NOT NULL;

-- The read role unwraps keys for the evidence pack (0024): it needs to know under which master key.
GRANT SELECT (master_key_id) ON customer_keys TO echotransact_reader;
