-- WordClaw Distribution: the whole data model, for fresh installs.
--
-- Applied at start-up by the MCP server, the worker and `wordclaw db upgrade`, under an
-- advisory lock so that processes starting together do not race. A database made by an
-- earlier release is brought here by wordclaw_mcp/migrations/ instead, in order; a test
-- proves the two paths give the same schema. Every statement must stay safe to run again
-- (`wordclaw db upgrade --force`).
--
-- Job state machine (River-style: each transition is one SQL statement in queries.py):
--
--   queued --claim (a new claim_token, attempt + 1)--> running --success--> succeeded
--     ^                  |----permanent failure or attempts exhausted--> failed
--     |                  |----it may have reached a channel that cannot take it twice--> failed
--     |                  |        (DELIVERY_OUTCOME_UNKNOWN)
--     |                  |----failure, lease lost or shutdown after a cancel request--> cancelled
--     |                  |----its target was deactivated--> failed (TARGET_INACTIVE)
--     +---retry (attempt > 0, next_attempt_at in the future)
--     +---throttled (429, Retry-After): back when the target's suspension ends, budget unspent
--     +---released uncounted: never started (the worker stopped, its plan was cancelled, or it
--         cannot decrypt the target's secrets)
--   queued --cancel_plan--> cancelled
--   queued --its target is deactivated--> failed (TARGET_INACTIVE)
--   running --lease expired (the worker vanished; its heartbeat renews the lease every
--             lease/3)--> queued, or failed when out of attempts or when the attempt had begun
--             sending to a channel that cannot take it twice (DELIVERY_OUTCOME_UNKNOWN)
--   any but succeeded --a late success of an earlier attempt--> succeeded (it was delivered)
--
-- Every move out of running names the claim (claim_token), never the attempt number alone. A
-- claim commits durably, so an attempt number is never handed out twice (a claim given back
-- unstarted made no attempt, and its number is the next one's).
--
-- Locks are taken in one order everywhere: targets, then jobs in id order, then plans in id
-- order (the job trigger). No statement that holds a job waits for a target.
--
-- The plan's status is derived from its jobs by a trigger in the same transaction as the
-- job change, so no code path can update a job and forget the plan.

CREATE TABLE IF NOT EXISTS schema_version (
    version     integer PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS tenants (
    id          text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO tenants (id) VALUES ('default') ON CONFLICT DO NOTHING;

-- An agent and its API key. Only the key's SHA-256 is kept, with its first characters to find
-- the row; the key itself is shown once, when it is made.
CREATE TABLE IF NOT EXISTS agents (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   text NOT NULL REFERENCES tenants (id),
    name        text NOT NULL CHECK (length(name) > 0),
    scopes      text[] NOT NULL
        CHECK (scopes <@ ARRAY['distribution:read', 'distribution:write', 'targets:admin', 'content:write', 'admin']),
    key_prefix  text UNIQUE,
    key_hash    bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK ((key_prefix IS NULL) = (key_hash IS NULL))
);

-- The local agent: the one-user default (an embedded database and no key configured) owns what
-- it creates. It has no key, so no one can authenticate as it over the network.
INSERT INTO agents (id, tenant_id, name, scopes)
VALUES ('00000000-0000-0000-0000-000000000001', 'default', 'local-agent', '{admin}')
ON CONFLICT DO NOTHING;

-- Every row belongs to a tenant: items, targets and plans carry it; jobs, receipts and events
-- belong to their plan's.
CREATE TABLE IF NOT EXISTS content_items (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    title          text NOT NULL CHECK (length(title) > 0),
    body_markdown  text NOT NULL,
    summary        text,
    canonical_url  text,
    metadata       jsonb NOT NULL DEFAULT '{}'::jsonb,
    version        integer NOT NULL DEFAULT 1 CHECK (version > 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    tenant_id      text NOT NULL REFERENCES tenants (id),
    created_by_agent_id  uuid NOT NULL REFERENCES agents (id)
);

CREATE TABLE IF NOT EXISTS distribution_targets (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name               text NOT NULL CHECK (length(name) > 0),
    channel_type       text NOT NULL,
    -- Non-secret settings only; secrets live encrypted in secret_ciphertext and are never read back out.
    config_json        jsonb NOT NULL DEFAULT '{}'::jsonb,
    secret_ciphertext  bytea,
    active             boolean NOT NULL DEFAULT true,
    suspended_until    timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    -- The last back-off used for a 429 that named no time: doubles up to a cap, reset on success.
    throttle_backoff_seconds  double precision,
    -- Limits the claim enforces across every worker: attempts in flight at once, and a token
    -- bucket of rate_per_minute tokens (a minute's worth), refilled continuously.
    max_concurrency    integer CHECK (max_concurrency > 0),
    rate_per_minute    double precision CHECK (rate_per_minute > 0),
    rate_tokens        double precision,
    rate_updated_at    timestamptz,
    -- The target's default transform policy (TransformPolicy, as JSON); a plan's wins field by field.
    transform_policy   jsonb,
    tenant_id          text NOT NULL REFERENCES tenants (id),
    -- A short fingerprint of the target's secrets, so that they can be told apart without being shown.
    secret_fingerprint text,
    -- Why it was deactivated, when it says (TARGET_GONE for a 410): its queued jobs fail with it.
    deactivated_reason text,
    -- Whether the server that registered it allowed loopback, private and reserved addresses
    -- (WORDCLAW_ALLOW_PRIVATE_TARGETS): workers deliver it under that policy, with or without the setting.
    private_addresses_allowed boolean NOT NULL DEFAULT false
);

-- Target names are unique within a tenant: a name taken in another tenant says nothing.
CREATE UNIQUE INDEX IF NOT EXISTS distribution_targets_tenant_name ON distribution_targets (tenant_id, name);

-- A grant of rights over one content item (or, with no item, over all of its tenant's items)
-- to an agent that did not create it. status is what an operator or the budget set; an active
-- grant past expires_at is expired whatever status says. distributions_used can never pass
-- max_distributions: the CHECK makes overspending impossible even under concurrency.
CREATE TABLE IF NOT EXISTS entitlements (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id             text NOT NULL REFERENCES tenants (id),
    agent_id              uuid NOT NULL REFERENCES agents (id),
    content_item_id       uuid REFERENCES content_items (id),
    status                text NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'expired', 'revoked', 'exhausted')),
    expires_at            timestamptz,
    allowed_channels      text[] NOT NULL DEFAULT '{}',
    allow_redistribution  boolean NOT NULL DEFAULT false,
    excerpt_only          boolean NOT NULL DEFAULT false,
    max_excerpt_chars     integer CHECK (max_excerpt_chars > 0),
    max_distributions     integer CHECK (max_distributions > 0),
    distributions_used    integer NOT NULL DEFAULT 0 CHECK (distributions_used >= 0),
    created_at            timestamptz NOT NULL DEFAULT now(),
    revoked_at            timestamptz,
    CHECK (max_distributions IS NULL OR distributions_used <= max_distributions)
);

CREATE INDEX IF NOT EXISTS entitlements_agent ON entitlements (agent_id, content_item_id);

CREATE TABLE IF NOT EXISTS distribution_plans (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    content_item_id      uuid NOT NULL REFERENCES content_items (id),
    content_version      integer NOT NULL,
    status               text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'succeeded', 'partial', 'failed', 'cancelled')),
    created_by_agent_id  uuid NOT NULL REFERENCES agents (id),
    idempotency_key      text,
    options              jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at           timestamptz NOT NULL DEFAULT now(),
    completed_at         timestamptz,
    cancel_requested_at  timestamptz,
    -- How many of its jobs are in each state (unattempted: queued, never tried), kept by the
    -- job trigger; the status is derived from them (wordclaw_plan_status_of).
    queued_jobs          integer NOT NULL DEFAULT 0,
    unattempted_jobs     integer NOT NULL DEFAULT 0,
    running_jobs         integer NOT NULL DEFAULT 0,
    succeeded_jobs       integer NOT NULL DEFAULT 0,
    failed_jobs          integer NOT NULL DEFAULT 0,
    cancelled_jobs       integer NOT NULL DEFAULT 0,
    tenant_id            text NOT NULL REFERENCES tenants (id),
    -- A digest of the arguments an idempotency key was first used with.
    request_digest       text
);

-- The duplicate rule's look-up: a tenant's recent plans for one item.
CREATE INDEX IF NOT EXISTS distribution_plans_recent ON distribution_plans (content_item_id, created_at);

CREATE UNIQUE INDEX IF NOT EXISTS distribution_plans_idempotency_key
    ON distribution_plans (created_by_agent_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE IF NOT EXISTS distribution_jobs (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    plan_id           uuid NOT NULL REFERENCES distribution_plans (id) ON DELETE CASCADE,
    target_id         uuid NOT NULL REFERENCES distribution_targets (id),
    position          integer NOT NULL DEFAULT 0,  -- the target's place in the plan's targetIds
    attempt           integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts      integer NOT NULL CHECK (max_attempts > 0),
    status            text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    lease_expires_at  timestamptz,
    locked_by         text,
    payload_snapshot  jsonb NOT NULL,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    -- Set by cancel_plan on a running job: its attempt may still succeed, but it is never retried.
    cancel_requested_at  timestamptz,
    -- Attempts the channel throttled (429, or Retry-After on 503): they do not spend the budget,
    -- which is attempt - throttles out of max_attempts.
    throttles         integer NOT NULL DEFAULT 0 CHECK (throttles >= 0),
    -- When the current run of throttled attempts began; past the limit the job fails.
    throttled_since   timestamptz,
    -- 1 for the jobs of a plan someone is waiting on (awaitDelivery): they are claimed first.
    priority          smallint NOT NULL DEFAULT 0,
    -- The grant a job was allowed by; the worker checks it again before sending. Null: the plan's
    -- agent created the item.
    entitlement_id    uuid REFERENCES entitlements (id),
    -- A running job always has a lease; a finished one never does.
    CHECK ((status = 'running') = (lease_expires_at IS NOT NULL)),
    -- The claim that holds a running job: every write about its attempt (the outcome, a lease
    -- renewal, a release, a rescue) names it, so a late or repeated write from an earlier claim
    -- never moves a later one. Null while no one holds the job.
    claim_token       uuid,
    -- When the current (or last) claim took the job.
    claimed_at        timestamptz,
    -- Set, durably, just before a channel that cannot make a resend safe (X) sends the current
    -- attempt's request: a rescue of that attempt then knows it may have reached the channel.
    sending_at        timestamptz,
    -- The first time an attempt of this job may have reached its channel (the claim's time, to be
    -- safe). A channel whose idempotency key expires (Mastodon's hour) is never sent the job again
    -- once its key may have expired. A redrive clears it.
    maybe_sent_at     timestamptz
);

-- Serve the claim: only queued rows are in them, in the order they are claimed (jobs someone
-- waits on first, then the longest due); the second holds first attempts only, for the share
-- of each claim reserved for fresh work.
CREATE INDEX IF NOT EXISTS distribution_jobs_claim
    ON distribution_jobs (priority DESC, next_attempt_at)
    WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS distribution_jobs_claim_fresh
    ON distribution_jobs (priority DESC, next_attempt_at)
    WHERE status = 'queued' AND attempt = 0;

-- Every running worker, for operators: a row is added when it starts, its heartbeat renews
-- it, and a clean stop removes it. A killed worker's row ages out (PRUNE_WORKERS).
CREATE TABLE IF NOT EXISTS workers (
    name          text PRIMARY KEY,
    host          text NOT NULL,
    pid           integer NOT NULL,
    concurrency   integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

-- Serves the rescue of attempts whose worker vanished (killed, or lost its database).
CREATE INDEX IF NOT EXISTS distribution_jobs_leases
    ON distribution_jobs (lease_expires_at)
    WHERE status = 'running';

CREATE INDEX IF NOT EXISTS distribution_jobs_plan ON distribution_jobs (plan_id);

-- A limited target's queue and what it has in flight, for the claim's per-target limits.
CREATE INDEX IF NOT EXISTS distribution_jobs_target_queue
    ON distribution_jobs (target_id, priority DESC, next_attempt_at)
    WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS distribution_jobs_running ON distribution_jobs (target_id) WHERE status = 'running';

-- The dead letters by target, for a redrive of one target's failed jobs.
CREATE INDEX IF NOT EXISTS distribution_jobs_failed ON distribution_jobs (target_id) WHERE status = 'failed';

-- Serves retention: finished jobs of one status, oldest first (wordclaw_mcp/retention.py).
CREATE INDEX IF NOT EXISTS distribution_jobs_finished
    ON distribution_jobs (status, finished_at)
    WHERE finished_at IS NOT NULL;

-- A feed target's entries (rss, atom): the worker upserts one per content item and renders the
-- whole feed from here, so a redelivered job replaces its entry instead of adding one.
CREATE TABLE IF NOT EXISTS feed_items (
    target_id     uuid NOT NULL REFERENCES distribution_targets (id) ON DELETE CASCADE,
    guid          text NOT NULL,
    entry         jsonb NOT NULL,
    published_at  timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target_id, guid)
);

CREATE INDEX IF NOT EXISTS feed_items_latest ON feed_items (target_id, published_at DESC);

-- The file a feed target writes (config_json.file, relative to WORDCLAW_FEEDS_DIR) is its own,
-- across tenants, active or not: two feeds never write one file. Compared without case: on a
-- case-insensitive file system News.xml and news.xml are one file.
CREATE UNIQUE INDEX IF NOT EXISTS distribution_targets_feed_file
    ON distribution_targets (lower(config_json->>'file')) WHERE channel_type IN ('rss', 'atom');

-- A channel's login session for a target (a Bluesky session's tokens), encrypted like the
-- target's secrets, so a worker reuses it instead of logging in for every post.
CREATE TABLE IF NOT EXISTS channel_sessions (
    target_id   uuid PRIMARY KEY REFERENCES distribution_targets (id) ON DELETE CASCADE,
    ciphertext  bytea NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Every entitlement decision, allow or deny, at plan creation, in a dry run and at delivery.
-- No foreign keys: the log outlives the plans and jobs retention removes.
CREATE TABLE IF NOT EXISTS entitlement_decisions (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        text NOT NULL,
    agent_id         uuid NOT NULL,
    content_item_id  uuid NOT NULL,
    target_id        uuid NOT NULL,
    channel_type     text NOT NULL,
    stage            text NOT NULL CHECK (stage IN ('plan', 'dry_run', 'delivery')),
    outcome          text NOT NULL CHECK (outcome IN ('allow', 'deny')),
    -- The denial's code, or the ground of an allowance: OWNER or ENTITLED.
    code             text NOT NULL,
    entitlement_id   uuid,
    plan_id          uuid,
    job_id           uuid,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS entitlement_decisions_created ON entitlement_decisions (created_at);

CREATE TABLE IF NOT EXISTS distribution_receipts (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id         uuid NOT NULL REFERENCES distribution_jobs (id) ON DELETE CASCADE,
    attempt        integer NOT NULL,
    succeeded      boolean NOT NULL,
    external_url   text,
    status_code    integer,
    error_message  text,
    raw_meta       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- One receipt per attempt: a write repeated after a lost commit acknowledgement, or a late
-- result after a rescue, meets the first receipt instead of adding a second.
CREATE UNIQUE INDEX IF NOT EXISTS distribution_receipts_attempt ON distribution_receipts (job_id, attempt);

-- The outbox: one row per state change, written by the triggers below in the same
-- transaction as the change, so subscribers never see a change that was rolled back.
CREATE TABLE IF NOT EXISTS distribution_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_type  text NOT NULL,
    plan_id     uuid NOT NULL,
    job_id      uuid,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS distribution_events_plan ON distribution_events (plan_id, id);

-- Serves retention: events oldest first.
CREATE INDEX IF NOT EXISTS distribution_events_created ON distribution_events (created_at);

-- The time the duplicate, idempotency and expiry rules read: the transaction's time, moved by
-- the session setting wordclaw.clock_offset (seconds), which only tests set.
CREATE OR REPLACE FUNCTION wordclaw_now() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT now() + make_interval(secs => coalesce(nullif(current_setting('wordclaw.clock_offset', true), ''), '0')::float8)
$$;

-- How many of a target's jobs are running, counted in a snapshot taken at the call: VOLATILE,
-- so the claim, which calls it once it holds the target's lock, sees the jobs other workers
-- claimed and committed after the claim statement began.
CREATE OR REPLACE FUNCTION wordclaw_running_jobs(p_target_id uuid) RETURNS integer
LANGUAGE sql VOLATILE AS $$
    SELECT count(*)::integer FROM distribution_jobs WHERE target_id = p_target_id AND status = 'running'
$$;

-- A plan's status from its jobs' statuses (the reference the counters are tested against):
--   some job not final:   'queued' while no job has been attempted, else 'running';
--   every job final:      all succeeded -> 'succeeded', all cancelled -> 'cancelled',
--                         none succeeded -> 'failed', otherwise 'partial'.
CREATE OR REPLACE FUNCTION wordclaw_plan_status(p_plan_id uuid) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN count(*) FILTER (WHERE status IN ('queued', 'running')) > 0 THEN
            CASE WHEN bool_and(status = 'queued' AND attempt = 0) THEN 'queued' ELSE 'running' END
        WHEN bool_and(status = 'succeeded') THEN 'succeeded'
        WHEN bool_and(status = 'cancelled') THEN 'cancelled'
        WHEN count(*) FILTER (WHERE status = 'succeeded') = 0 THEN 'failed'
        ELSE 'partial'
    END
    FROM distribution_jobs
    WHERE plan_id = p_plan_id
$$;

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
    -- Wakes agents waiting for this plan to end (awaitDelivery) instead of making them poll.
    -- Only its end: a transaction that notifies holds one database-wide lock through its
    -- commit, so a notification on every claim serialised the workers' commits.
    IF TG_OP = 'UPDATE' AND NEW.status NOT IN ('queued', 'running') THEN
        PERFORM pg_notify('wordclaw_plans', NEW.id::text);
    END IF;
    RETURN NULL;
END
$$;

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

CREATE OR REPLACE TRIGGER distribution_targets_deactivated
    AFTER UPDATE ON distribution_targets
    REFERENCING OLD TABLE AS old_targets NEW TABLE AS new_targets
    FOR EACH STATEMENT EXECUTE FUNCTION wordclaw_target_deactivated();

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
