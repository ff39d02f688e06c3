-- 0002: a cancel that sticks on running jobs, one receipt per attempt, and jobs of a
-- deactivated target that end instead of waiting for ever.

ALTER TABLE distribution_plans ADD COLUMN cancel_requested_at timestamptz;
ALTER TABLE distribution_jobs ADD COLUMN cancel_requested_at timestamptz;

-- Before the unique index: version 1 could write a second receipt for an attempt (a retried
-- batch, or a late result after a rescue). Keep one per attempt, a success first, else the oldest.
DELETE FROM distribution_receipts r
USING (
    SELECT id, row_number() OVER (PARTITION BY job_id, attempt ORDER BY succeeded DESC, created_at, id) AS n
    FROM distribution_receipts
) ranked
WHERE r.id = ranked.id AND ranked.n > 1;

DROP INDEX distribution_receipts_job;
CREATE UNIQUE INDEX distribution_receipts_attempt ON distribution_receipts (job_id, attempt);

CREATE FUNCTION wordclaw_target_deactivated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE distribution_jobs
    SET status = 'failed',
        last_error = 'TARGET_INACTIVE: the target was deactivated before this job was delivered.',
        finished_at = now(),
        updated_at = now()
    WHERE target_id = NEW.id AND status = 'queued';
    RETURN NULL;
END
$$;

CREATE TRIGGER distribution_targets_deactivated
    AFTER UPDATE OF active ON distribution_targets
    FOR EACH ROW WHEN (OLD.active AND NOT NEW.active)
    EXECUTE FUNCTION wordclaw_target_deactivated();

-- Jobs already stuck behind a deactivated target.
UPDATE distribution_jobs j
SET status = 'failed',
    last_error = 'TARGET_INACTIVE: the target was deactivated before this job was delivered.',
    finished_at = now(),
    updated_at = now()
FROM distribution_targets t
WHERE t.id = j.target_id AND NOT t.active AND j.status = 'queued';
