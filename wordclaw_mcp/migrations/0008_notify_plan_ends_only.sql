-- 0008: a plan's notification is sent when it ends, not when its first job is claimed.
-- Every transaction that calls pg_notify takes a database-wide lock at commit and holds it
-- until the commit is flushed; with a notification on each plan that a claim moved to
-- 'running', the workers' claims and writes queued behind one another on that lock
-- (pg_stat_activity: Lock:object). Agents awaiting a plan wait for its end, and still poll.

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
    -- Wakes agents waiting for this plan to end (awaitDelivery) instead of making them poll.
    -- Only its end: a transaction that notifies holds one database-wide lock through its
    -- commit, so a notification on every claim serialised the workers' commits.
    IF TG_OP = 'UPDATE' AND NEW.status NOT IN ('queued', 'running') THEN
        PERFORM pg_notify('wordclaw_plans', NEW.id::text);
    END IF;
    RETURN NULL;
END
$$;
