-- 0005: per-target limits, enforced in the claim: attempts in flight, and a rate per minute.

ALTER TABLE distribution_targets ADD COLUMN max_concurrency integer CHECK (max_concurrency > 0);
ALTER TABLE distribution_targets ADD COLUMN rate_per_minute double precision CHECK (rate_per_minute > 0);
ALTER TABLE distribution_targets ADD COLUMN rate_tokens double precision;
ALTER TABLE distribution_targets ADD COLUMN rate_updated_at timestamptz;

CREATE INDEX distribution_jobs_target_queue
    ON distribution_jobs (target_id, priority DESC, next_attempt_at)
    WHERE status = 'queued';
CREATE INDEX distribution_jobs_running ON distribution_jobs (target_id) WHERE status = 'running';
