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
