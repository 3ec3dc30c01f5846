-- Readiness reports each projection's lag as the newest outbox position minus the newest
-- position it applied; without this index that is a scan of every aggregate's row per probe.
CREATE INDEX IF NOT EXISTS projection_versions_position_idx ON projection_versions (projection, position);
