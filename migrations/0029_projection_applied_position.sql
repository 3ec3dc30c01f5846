-- Each projection's newest applied position, kept on its checkpoint row and moved by every batch
-- it applies (projections/engine.py), instead of read as max(position) of projection_versions
-- through the index on (projection, position) that 0009 added for it. That index was a third of
-- the cost of every version row written: a version row is inserted per projection and aggregate
-- (eight per session), and each later event of the aggregate changed its indexed position, so no
-- update of a version row was HOT. Readiness, metrics and the console now read one row per
-- projection. A checkpoint row with position 0 says what no row said: nothing checkpointed yet.
ALTER TABLE projection_checkpoints ADD COLUMN IF NOT EXISTS applied_position bigint NOT NULL DEFAULT 0;

INSERT INTO projection_checkpoints (projection, position, applied_position)
SELECT projection, 0, max(position) FROM projection_versions GROUP BY projection
ON CONFLICT (projection) DO UPDATE
SET applied_position = GREATEST(projection_checkpoints.applied_position, excluded.applied_position);

DROP INDEX IF EXISTS projection_versions_position_idx;

-- Room on each page for a version row's next version, so its update stays on the page (HOT) and
-- writes no index entry. New pages only; a rebuild or VACUUM FULL spreads existing rows.
ALTER TABLE projection_versions SET (fillfactor = 80);
