-- 0004: leases renewed by heartbeats, with a table of running workers; throttled attempts
-- that spend no budget; dead letters found by target for a redrive; a fast lane in the claim.

CREATE TABLE workers (
    name          text PRIMARY KEY,
    host          text NOT NULL,
    pid           integer NOT NULL,
    concurrency   integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE distribution_targets ADD COLUMN throttle_backoff_seconds double precision;
ALTER TABLE distribution_jobs ADD COLUMN throttles integer NOT NULL DEFAULT 0 CHECK (throttles >= 0);
ALTER TABLE distribution_jobs ADD COLUMN throttled_since timestamptz;

CREATE INDEX distribution_jobs_failed ON distribution_jobs (target_id) WHERE status = 'failed';

-- The fast lane: awaited plans first, and a share of each claim for first attempts.
ALTER TABLE distribution_jobs ADD COLUMN priority smallint NOT NULL DEFAULT 0;
DROP INDEX distribution_jobs_claim;
CREATE INDEX distribution_jobs_claim
    ON distribution_jobs (priority DESC, next_attempt_at)
    WHERE status = 'queued';
CREATE INDEX distribution_jobs_claim_fresh
    ON distribution_jobs (priority DESC, next_attempt_at)
    WHERE status = 'queued' AND attempt = 0;

-- The job trigger, now naming a throttled requeue distribution.job.throttled, and telling the
-- worker holding a running job that its plan was cancelled.
CREATE OR REPLACE FUNCTION wordclaw_jobs_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    touched uuid[];
BEGIN
    SELECT array_agg(DISTINCT n.plan_id ORDER BY n.plan_id) INTO touched
    FROM new_jobs n JOIN old_jobs o ON o.id = n.id
    WHERE n.status IS DISTINCT FROM o.status;

    INSERT INTO distribution_events (event_type, plan_id, job_id, payload)
    SELECT CASE WHEN n.throttles > o.throttles THEN 'distribution.job.throttled'
                ELSE 'distribution.job.' || n.status END,
           n.plan_id, n.id,
           jsonb_build_object('jobId', n.id, 'planId', n.plan_id, 'targetId', n.target_id,
                              'status', n.status, 'attempt', n.attempt, 'lastError', n.last_error)
    FROM new_jobs n JOIN old_jobs o ON o.id = n.id
    WHERE n.status IS DISTINCT FROM o.status
       OR (n.status = 'queued' AND n.attempt IS DISTINCT FROM o.attempt);

    -- Tells the worker holding a running job that its plan was cancelled (CANCEL_PLAN).
    PERFORM pg_notify('wordclaw_cancel', n.id::text)
    FROM new_jobs n JOIN old_jobs o ON o.id = n.id
    WHERE n.status = 'running' AND n.cancel_requested_at IS NOT NULL AND o.cancel_requested_at IS NULL;

    IF touched IS NULL THEN
        RETURN NULL;
    END IF;

    PERFORM 1 FROM distribution_plans WHERE id = ANY (touched) ORDER BY id FOR UPDATE;

    UPDATE distribution_plans p
    SET status = s.status,
        completed_at = CASE WHEN s.status IN ('queued', 'running') THEN NULL
                            ELSE coalesce(p.completed_at, now()) END
    FROM (SELECT plan_id, wordclaw_plan_status(plan_id) AS status FROM unnest(touched) AS plan_id) s
    WHERE p.id = s.plan_id AND p.status IS DISTINCT FROM s.status;
    RETURN NULL;
END
$$;
