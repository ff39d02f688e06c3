-- 0006: a plan's status kept from counters of its jobs in each state, which the job trigger
-- adds to, instead of re-reading every job of each touched plan; outbox events only for what
-- the event stream publishes (no job.running, job.queued or plan.running).

ALTER TABLE distribution_plans
    ADD COLUMN queued_jobs integer NOT NULL DEFAULT 0,
    ADD COLUMN unattempted_jobs integer NOT NULL DEFAULT 0,
    ADD COLUMN running_jobs integer NOT NULL DEFAULT 0,
    ADD COLUMN succeeded_jobs integer NOT NULL DEFAULT 0,
    ADD COLUMN failed_jobs integer NOT NULL DEFAULT 0,
    ADD COLUMN cancelled_jobs integer NOT NULL DEFAULT 0;

-- The counts of the jobs there are now. Plans whose jobs retention already deleted keep zeros:
-- they are final, and their status stays as it is.
UPDATE distribution_plans p
SET queued_jobs = c.queued, unattempted_jobs = c.unattempted, running_jobs = c.running,
    succeeded_jobs = c.succeeded, failed_jobs = c.failed, cancelled_jobs = c.cancelled
FROM (
    SELECT plan_id,
           count(*) FILTER (WHERE status = 'queued') AS queued,
           count(*) FILTER (WHERE status = 'queued' AND attempt = 0) AS unattempted,
           count(*) FILTER (WHERE status = 'running') AS running,
           count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (WHERE status = 'cancelled') AS cancelled
    FROM distribution_jobs
    GROUP BY plan_id
) c
WHERE p.id = c.plan_id;

-- A plan's status from the counts of its jobs in each state, the same rules as
-- wordclaw_plan_status: this is what the job trigger keeps each plan's status with.
CREATE OR REPLACE FUNCTION wordclaw_plan_status_of(
    queued integer, unattempted integer, running integer, succeeded integer, failed integer, cancelled integer
) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN queued + running > 0 THEN
            CASE WHEN unattempted = queued + running + succeeded + failed + cancelled THEN 'queued'
                 ELSE 'running' END
        WHEN succeeded > 0 AND failed + cancelled = 0 THEN 'succeeded'
        WHEN cancelled > 0 AND succeeded + failed = 0 THEN 'cancelled'
        WHEN succeeded = 0 THEN 'failed'
        ELSE 'partial'
    END
$$;

-- Statement-level with transition tables, on insert and on update: a batch claim or completion
-- rolls up each touched plan once, in one grouped statement, by adding what moved to the
-- plan's counters; no job is read again.
--
-- The touched plans are locked in id order first, so that two batches never deadlock on them.
-- Two workers finishing a plan's last two jobs at once each add to the counters as they stand
-- when it is their turn: under READ COMMITTED an UPDATE that waited for a row lock re-reads the
-- row, so the second sees the first's counts and sets the final status.
--
-- Events are only what the event stream publishes: a job's end, and a throttled attempt.
-- Claims and retries show in the job and its receipts; an event for each doubled the outbox.
CREATE OR REPLACE FUNCTION wordclaw_jobs_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    plan_ids uuid[];
    statuses text[];
    unattempted boolean[];
    signs integer[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(plan_id), array_agg(status), array_agg(attempt = 0), array_agg(1)
        INTO plan_ids, statuses, unattempted, signs
        FROM new_jobs;
        -- One wake-up per inserting statement, not per job: workers claim in batches anyway.
        PERFORM pg_notify('wordclaw_jobs', '');
    ELSE
        INSERT INTO distribution_events (event_type, plan_id, job_id, payload)
        SELECT CASE WHEN n.throttles > o.throttles THEN 'distribution.job.throttled'
                    ELSE 'distribution.job.' || n.status END,
               n.plan_id, n.id,
               jsonb_build_object('jobId', n.id, 'planId', n.plan_id, 'targetId', n.target_id,
                                  'status', n.status, 'attempt', n.attempt, 'lastError', n.last_error)
        FROM new_jobs n JOIN old_jobs o ON o.id = n.id
        WHERE (n.status IS DISTINCT FROM o.status AND n.status IN ('succeeded', 'failed', 'cancelled'))
           OR n.throttles > o.throttles;

        -- Tells the worker holding a running job that its plan was cancelled (CANCEL_PLAN).
        PERFORM pg_notify('wordclaw_cancel', n.id::text)
        FROM new_jobs n JOIN old_jobs o ON o.id = n.id
        WHERE n.status = 'running' AND n.cancel_requested_at IS NOT NULL AND o.cancel_requested_at IS NULL;

        -- Each job that moved counts out of its old state and into its new one.
        SELECT array_agg(m.plan_id), array_agg(m.status), array_agg(m.unattempted), array_agg(m.sign)
        INTO plan_ids, statuses, unattempted, signs
        FROM new_jobs n
        JOIN old_jobs o ON o.id = n.id
        CROSS JOIN LATERAL (VALUES (n.plan_id, n.status, n.attempt = 0, 1),
                                   (o.plan_id, o.status, o.attempt = 0, -1)) AS m (plan_id, status, unattempted, sign)
        WHERE n.status IS DISTINCT FROM o.status
           OR n.plan_id IS DISTINCT FROM o.plan_id
           OR (n.status = 'queued' AND (n.attempt = 0) IS DISTINCT FROM (o.attempt = 0));
    END IF;

    IF plan_ids IS NULL THEN
        RETURN NULL;
    END IF;

    PERFORM 1 FROM distribution_plans WHERE id = ANY (plan_ids) ORDER BY id FOR UPDATE;

    UPDATE distribution_plans p
    SET queued_jobs = p.queued_jobs + d.queued,
        unattempted_jobs = p.unattempted_jobs + d.unattempted,
        running_jobs = p.running_jobs + d.running,
        succeeded_jobs = p.succeeded_jobs + d.succeeded,
        failed_jobs = p.failed_jobs + d.failed,
        cancelled_jobs = p.cancelled_jobs + d.cancelled,
        status = wordclaw_plan_status_of(
            p.queued_jobs + d.queued, p.unattempted_jobs + d.unattempted, p.running_jobs + d.running,
            p.succeeded_jobs + d.succeeded, p.failed_jobs + d.failed, p.cancelled_jobs + d.cancelled),
        completed_at = CASE WHEN p.queued_jobs + d.queued + p.running_jobs + d.running > 0 THEN NULL
                            ELSE coalesce(p.completed_at, now()) END
    FROM (
        SELECT m.plan_id,
               sum(CASE WHEN m.status = 'queued' THEN m.sign ELSE 0 END)::int AS queued,
               sum(CASE WHEN m.status = 'queued' AND m.unattempted THEN m.sign ELSE 0 END)::int AS unattempted,
               sum(CASE WHEN m.status = 'running' THEN m.sign ELSE 0 END)::int AS running,
               sum(CASE WHEN m.status = 'succeeded' THEN m.sign ELSE 0 END)::int AS succeeded,
               sum(CASE WHEN m.status = 'failed' THEN m.sign ELSE 0 END)::int AS failed,
               sum(CASE WHEN m.status = 'cancelled' THEN m.sign ELSE 0 END)::int AS cancelled
        FROM unnest(plan_ids, statuses, unattempted, signs) AS m (plan_id, status, unattempted, sign)
        GROUP BY m.plan_id
    ) d
    WHERE p.id = d.plan_id;
    RETURN NULL;
END
$$;

-- The event stream publishes a plan's creation and its end, not the steps between.
CREATE OR REPLACE FUNCTION wordclaw_plan_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status NOT IN ('queued', 'running') THEN
        INSERT INTO distribution_events (event_type, plan_id, payload)
        VALUES (
            CASE WHEN TG_OP = 'INSERT' THEN 'distribution.plan.created' ELSE 'distribution.plan.completed' END,
            NEW.id,
            jsonb_build_object('planId', NEW.id, 'contentItemId', NEW.content_item_id, 'status', NEW.status));
    END IF;
    -- Wakes agents waiting on this plan (awaitDelivery) instead of making them poll.
    PERFORM pg_notify('wordclaw_plans', NEW.id::text);
    RETURN NULL;
END
$$;

DROP TRIGGER distribution_plans_changed ON distribution_plans;
DROP TRIGGER distribution_jobs_inserted ON distribution_jobs;
DROP FUNCTION wordclaw_jobs_inserted();

CREATE OR REPLACE TRIGGER distribution_jobs_changed
    AFTER UPDATE ON distribution_jobs
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION wordclaw_jobs_changed();

CREATE OR REPLACE TRIGGER distribution_jobs_inserted
    AFTER INSERT ON distribution_jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION wordclaw_jobs_changed();

CREATE OR REPLACE TRIGGER distribution_plans_created
    AFTER INSERT ON distribution_plans
    FOR EACH ROW EXECUTE FUNCTION wordclaw_plan_changed();

-- Every job move rewrites its plan's counters; only a change of status is news.
CREATE OR REPLACE TRIGGER distribution_plans_changed
    AFTER UPDATE OF status ON distribution_plans
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION wordclaw_plan_changed();
