-- What each projection applied of an aggregate, in one row per aggregate instead of one per
-- projection and aggregate: applied = {projection: [version, position]}. The engine always read
-- and locked every projection's rows of a batch's aggregates together, and wrote them together
-- (projections/engine.py); eight rows per session made the versions the largest cost of a batch
-- and of a replay (2-4 us of index and heap work a row, four rows an event). A projection rebuilt
-- alone (replay --projection NAME) loses its entries only. The applied value is never indexed, so
-- with room left on each page an update stays on the page (HOT).
CREATE TABLE projection_versions_by_aggregate (
    aggregate_id uuid PRIMARY KEY,
    applied jsonb NOT NULL
) WITH (fillfactor = 80);

INSERT INTO projection_versions_by_aggregate (aggregate_id, applied)
SELECT aggregate_id, jsonb_object_agg(projection, jsonb_build_array(version, position))
FROM projection_versions GROUP BY aggregate_id;

DROP TABLE projection_versions;
ALTER TABLE projection_versions_by_aggregate RENAME TO projection_versions;
ALTER INDEX projection_versions_by_aggregate_pkey RENAME TO projection_versions_pkey;

-- As 0015 granted the table it replaces: the worker inserts and updates, replay (the owner) empties.
GRANT SELECT, INSERT, UPDATE ON projection_versions TO echotransact_app;
