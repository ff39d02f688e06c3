-- 0013: every claim gets its own token, and channels that cannot take a request twice are
-- never sent one twice: the claim token, when the claim began, whether the current attempt began
-- sending to such a channel, and when an attempt may first have reached the channel. The
-- deactivation trigger locks jobs in id order, as every other statement does.

ALTER TABLE distribution_jobs
    ADD COLUMN IF NOT EXISTS claim_token uuid,
    ADD COLUMN IF NOT EXISTS claimed_at timestamptz,
    ADD COLUMN IF NOT EXISTS sending_at timestamptz,
    ADD COLUMN IF NOT EXISTS maybe_sent_at timestamptz;

-- Attempts running at the upgrade get a token too, so that every running job has one; a worker
-- of the earlier release still records its own by attempt number.
UPDATE distribution_jobs SET claim_token = gen_random_uuid(), claimed_at = updated_at
WHERE status = 'running' AND claim_token IS NULL;

-- A deactivated target's queued jobs can never be claimed: fail them now so their plans end.
-- Its running jobs fail when their attempt is recorded (RECORD_ATTEMPTS, RESCUE_EXPIRED_LEASES).
CREATE OR REPLACE FUNCTION wordclaw_target_deactivated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Its jobs in id order, the order every statement locks jobs in, so that a cancel or a batch
    -- write holding some of them cannot deadlock with this.
    UPDATE distribution_jobs
    SET status = 'failed',
        last_error = 'TARGET_INACTIVE: the target was deactivated before this job was delivered.',
        finished_at = now(),
        updated_at = now()
    WHERE id IN (
        SELECT id FROM distribution_jobs WHERE target_id = NEW.id AND status = 'queued' ORDER BY id FOR UPDATE
    );
    RETURN NULL;
END
$$;
