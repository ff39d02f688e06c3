-- 0003: indexes for retention, so pruning old jobs and events walks them oldest first instead of
-- scanning the tables (wordclaw_mcp/retention.py, the retention section of queries.py).
--
-- The runner applies a migration inside one transaction, so these are plain CREATE INDEX: each
-- holds off writes to its table while it is built, which on a large table is a pause in delivery.
-- To avoid it, build them beforehand with CREATE INDEX CONCURRENTLY IF NOT EXISTS and the same
-- definitions; IF NOT EXISTS here then leaves them alone.

CREATE INDEX IF NOT EXISTS distribution_jobs_finished
    ON distribution_jobs (status, finished_at)
    WHERE finished_at IS NOT NULL;

CREATE INDEX IF NOT EXISTS distribution_events_created ON distribution_events (created_at);
