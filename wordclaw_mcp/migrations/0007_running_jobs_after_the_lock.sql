-- 0007: the claim counts a limited target's running jobs after locking the target, in a
-- snapshot of their own, so that two workers cannot both fill a concurrency limit's last slot.

-- How many of a target's jobs are running, counted in a snapshot taken at the call: VOLATILE,
-- so the claim, which calls it once it holds the target's lock, sees the jobs other workers
-- claimed and committed after the claim statement began.
CREATE OR REPLACE FUNCTION wordclaw_running_jobs(p_target_id uuid) RETURNS integer
LANGUAGE sql VOLATILE AS $$
    SELECT count(*)::integer FROM distribution_jobs WHERE target_id = p_target_id AND status = 'running'
$$;
