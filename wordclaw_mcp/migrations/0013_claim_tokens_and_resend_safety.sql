-- 0013: every claim gets its own token, and channels that cannot take a request twice are
-- never sent one twice: the claim token, when the claim began, whether the current attempt began
-- sending to such a channel, and when an attempt may first have reached the channel. Locks in one
-- order: the deactivation trigger becomes statement-level and locks jobs in id order, and a
-- target keeps the reason it was deactivated for, which its queued jobs fail with.

ALTER TABLE distribution_targets ADD COLUMN IF NOT EXISTS deactivated_reason text;

ALTER TABLE distribution_jobs
    ADD COLUMN IF NOT EXISTS claim_token uuid,
    ADD COLUMN IF NOT EXISTS claimed_at timestamptz,
    ADD COLUMN IF NOT EXISTS sending_at timestamptz,
    ADD COLUMN IF NOT EXISTS maybe_sent_at timestamptz;

-- Attempts running at the upgrade get a token too, so that every running job has one; a worker
-- of the earlier release still records its own by attempt number.
UPDATE distribution_jobs SET claim_token = gen_random_uuid(), claimed_at = updated_at
WHERE status = 'running' AND claim_token IS NULL;

-- A worker of the earlier release may be sending such an attempt to X or by email right now, and
-- did not say so: if it dies, its rescue must take the attempt for one that may have been sent.
UPDATE distribution_jobs j SET sending_at = j.updated_at
FROM distribution_targets t
WHERE t.id = j.target_id AND j.status = 'running' AND t.channel_type IN ('x', 'email') AND j.sending_at IS NULL;

-- A retry the earlier release queued may follow an attempt that reached the channel: from its
-- first failed attempt on, as a rescue would have it (Mastodon's key lasts an hour from then).
UPDATE distribution_jobs j SET maybe_sent_at = r.first_failed
FROM (SELECT job_id, min(created_at) AS first_failed FROM distribution_receipts WHERE NOT succeeded GROUP BY job_id) r
WHERE r.job_id = j.id AND j.status = 'queued' AND j.attempt > 0 AND j.maybe_sent_at IS NULL;

-- The earlier release retried X's 5xx, which may have come after the post was made: such a retry is
-- not sent by itself any more. It fails as this release would have failed it.
UPDATE distribution_jobs j
SET status = 'failed', finished_at = now(), updated_at = now(),
    last_error = 'DELIVERY_OUTCOME_UNKNOWN: an earlier attempt may have reached X (it answered with a 5xx), and X '
                 'cannot take a post twice, so it is not sent again by itself. Check the account for the post, and '
                 'redrive the job (retry_plan, or wordclaw jobs redrive) only if it is not there.'
FROM distribution_targets t
WHERE t.id = j.target_id AND t.channel_type = 'x' AND j.status = 'queued'
  AND EXISTS (SELECT 1 FROM distribution_receipts r WHERE r.job_id = j.id AND r.status_code >= 500);

-- A deactivated target's queued jobs can never be claimed: fail them now so their plans end, with
-- the target's deactivated_reason (TARGET_INACTIVE when none). Its running jobs fail when their
-- attempt is recorded (RECORD_ATTEMPTS, RESCUE_EXPIRED_LEASES).
--
-- Statement-level, so that one UPDATE of several targets fails all their jobs in one statement:
-- the jobs in id order, then (their trigger) the plans in id order, as every statement locks them.
-- Row by row, each target's jobs would lock their plans in a round of their own, out of order.
CREATE OR REPLACE FUNCTION wordclaw_target_deactivated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM old_targets o JOIN new_targets n ON n.id = o.id WHERE o.active AND NOT n.active) THEN
        RETURN NULL;
    END IF;
    UPDATE distribution_jobs j
    SET status = 'failed',
        last_error = coalesce(n.deactivated_reason,
                              'TARGET_INACTIVE: the target was deactivated before this job was delivered.'),
        finished_at = now(),
        updated_at = now()
    FROM new_targets n
    WHERE n.id = j.target_id AND j.id IN (
        SELECT q.id
        FROM distribution_jobs q
        JOIN new_targets n ON n.id = q.target_id
        JOIN old_targets o ON o.id = n.id
        WHERE o.active AND NOT n.active AND q.status = 'queued'
        ORDER BY q.id
        FOR UPDATE OF q
    );
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS distribution_targets_deactivated ON distribution_targets;

CREATE TRIGGER distribution_targets_deactivated
    AFTER UPDATE ON distribution_targets
    REFERENCING OLD TABLE AS old_targets NEW TABLE AS new_targets
    FOR EACH STATEMENT EXECUTE FUNCTION wordclaw_target_deactivated();
