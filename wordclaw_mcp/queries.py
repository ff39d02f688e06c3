"""Every SQL statement the application runs, named. The data model itself is schema.sql.

Each job state transition is exactly one statement; the plan rollup and the outbox event
ride along in the same transaction through the triggers in schema.sql.
"""

# --- schema -----------------------------------------------------------------------------------

# The schema transaction's first statement: a long migration, or waiting for another process's,
# must not be cut off by the session's statement and lock timeouts. LOCAL: COMMIT restores them.
SCHEMA_LIFT_TIMEOUTS = "SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0"

SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('wordclaw.schema'))"
SCHEMA_TABLE_EXISTS = "SELECT to_regclass('schema_version') IS NOT NULL"
SCHEMA_VERSION = "SELECT coalesce(max(version), 0) FROM schema_version"
RECORD_SCHEMA_VERSION = "INSERT INTO schema_version (version) VALUES ($1) ON CONFLICT DO NOTHING"

EMBEDDED_CREATE_LOCK = "SELECT pg_advisory_lock(hashtext('wordclaw.create_database'))"
DATABASE_EXISTS = "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)"


def create_database(name: str, template: str | None = None) -> str:
    """CREATE DATABASE takes no parameters, so names are quoted here and nowhere else."""
    sql = f"CREATE DATABASE {_ident(name)}"
    return f"{sql} TEMPLATE {_ident(template)}" if template else sql


def drop_database(name: str) -> str:
    return f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- content items ----------------------------------------------------------------------------

# Every statement an agent's call runs names its tenant: a row of another tenant is not found.

_CONTENT_COLUMNS = """
    id, title, body_markdown AS body, summary, canonical_url, metadata, version, created_at, updated_at,
    created_by_agent_id
"""

# $6 tenant, $7 the creating agent.
INSERT_CONTENT_ITEM = f"""
INSERT INTO content_items (title, body_markdown, summary, canonical_url, metadata, tenant_id, created_by_agent_id)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING {_CONTENT_COLUMNS}
"""

UPDATE_CONTENT_ITEM = f"""
UPDATE content_items
SET title = $2, body_markdown = $3, summary = $4, canonical_url = $5, metadata = $6,
    version = version + 1, updated_at = now()
WHERE id = $1 AND tenant_id = $7
RETURNING {_CONTENT_COLUMNS}
"""

GET_CONTENT_ITEM = f"SELECT {_CONTENT_COLUMNS} FROM content_items WHERE id = $1 AND tenant_id = $2"

# --- targets ----------------------------------------------------------------------------------

_TARGET_COLUMNS = """
    id, name, channel_type, config_json AS config, secret_ciphertext IS NOT NULL AS has_secrets,
    secret_fingerprint, active, suspended_until, created_at, max_concurrency, rate_per_minute, transform_policy
"""

INSERT_TARGET = f"""
INSERT INTO distribution_targets
    (id, name, channel_type, config_json, secret_ciphertext, max_concurrency, rate_per_minute, transform_policy,
     tenant_id, secret_fingerprint, private_addresses_allowed)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (tenant_id, name) DO NOTHING
RETURNING {_TARGET_COLUMNS}
"""

GET_TARGET_SECRETS = "SELECT channel_type, secret_ciphertext FROM distribution_targets WHERE id = $1 AND tenant_id = $2"

# Replaces a target's encrypted secrets (a rotation). The worker's cache is keyed by ciphertext,
# so the next claim carries, and decrypts, the new one.
UPDATE_TARGET_SECRETS = """
UPDATE distribution_targets SET secret_ciphertext = $2, secret_fingerprint = $3, updated_at = now() WHERE id = $1
"""

# --- feeds ------------------------------------------------------------------------------------

# Held while a delivery upserts its entry, reads the newest and writes the feed's file: two
# deliveries to one feed take turns, so the file written last holds every entry the table does.
LOCK_FEED = "SELECT pg_advisory_xact_lock(hashtextextended('feed:' || $1::uuid::text, 0))"

# A content item's entry in a feed, by its stable guid: a redelivery or a new version of the
# item replaces the entry, keeping when it was first published.
UPSERT_FEED_ITEM = """
INSERT INTO feed_items (target_id, guid, entry, published_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT (target_id, guid) DO UPDATE SET entry = excluded.entry, updated_at = now()
"""

# The newest entries of a feed, newest first.
FEED_ITEMS = """
SELECT entry FROM feed_items WHERE target_id = $1 ORDER BY published_at DESC, guid LIMIT $2
"""

GET_CHANNEL_SESSION = "SELECT ciphertext FROM channel_sessions WHERE target_id = $1"

PUT_CHANNEL_SESSION = """
INSERT INTO channel_sessions (target_id, ciphertext) VALUES ($1, $2)
ON CONFLICT (target_id) DO UPDATE SET ciphertext = excluded.ciphertext, updated_at = now()
"""

GET_FEED_TARGET = (
    "SELECT channel_type, config_json AS config FROM distribution_targets WHERE id = $1 AND tenant_id = $2"
)

LIST_TARGETS = f"SELECT {_TARGET_COLUMNS} FROM distribution_targets WHERE tenant_id = $1 ORDER BY created_at, name"

# What a plan is made from, in one round trip: its content item ($1, null if not found) and
# those of its targets ($2) that exist, all within the tenant ($3), as JSON.
GET_PLAN_INPUTS = f"""
SELECT (SELECT to_jsonb(c) FROM (SELECT {_CONTENT_COLUMNS} FROM content_items WHERE id = $1 AND tenant_id = $3) c)
           AS item,
       (SELECT coalesce(jsonb_agg(to_jsonb(t)), '[]')
        FROM (SELECT {_TARGET_COLUMNS} FROM distribution_targets WHERE id = ANY ($2::uuid[]) AND tenant_id = $3) t)
           AS targets
"""

# --- plans ------------------------------------------------------------------------------------

_PLAN_COLUMNS = "id, content_item_id, content_version, status, created_at, completed_at, cancel_requested_at"

_JOB_COLUMNS = "id, target_id, status, attempt, max_attempts, next_attempt_at, last_error, updated_at"

# The locks a plan's creation holds until it commits, taken in one order so that two creations
# never deadlock: one per (tenant, item, target), so that two plans for the same item and target
# are made one after the other and the second sees the first (the duplicate rule); and one for
# the agent's idempotency key, if it gave one. $1 tenant, $2 item, $3 target ids, $4 agent,
# $5 idempotency key (null: none).
LOCK_PLAN_KEYS = """
SELECT count(pg_advisory_xact_lock(k))
FROM (
    SELECT DISTINCT k FROM (
        SELECT hashtextextended('plan:' || $1::text || ':' || $2::uuid::text || ':' || t::text, 0) AS k
        FROM unnest($3::uuid[]) AS t
        UNION ALL
        SELECT hashtextextended('idempotency:' || $4::uuid::text || ':' || $5::text, 0) WHERE $5 IS NOT NULL
    ) keys
    ORDER BY k
) ordered
"""

# The plan an agent's idempotency key made in the last 24 hours, if any; read under the key's
# lock (LOCK_PLAN_KEYS). An older use of the key is retired first, so the key can make a new plan.
FIND_IDEMPOTENT_PLAN = f"""
WITH retired AS (
    UPDATE distribution_plans SET idempotency_key = NULL
    WHERE created_by_agent_id = $1 AND idempotency_key = $2 AND created_at <= wordclaw_now() - interval '24 hours'
)
SELECT {_PLAN_COLUMNS}, request_digest
FROM distribution_plans
WHERE created_by_agent_id = $1 AND idempotency_key = $2 AND created_at > wordclaw_now() - interval '24 hours'
"""

# Spend the grants a plan's jobs rely on, one distribution per job: parallel arrays of grant
# ids ($1) and job counts ($2). A grant that is no longer active, has expired, or has too little
# left is not touched and not returned; the rows are locked in id order first, so two plans
# spending the same grants wait for each other instead of deadlocking, and the second sees what
# the first spent. A grant whose budget this spends to the last becomes exhausted.
SPEND_ENTITLEMENTS = """
WITH wanted AS (
    SELECT e.id, s.n
    FROM entitlements e JOIN unnest($1::uuid[], $2::int[]) AS s (id, n) ON s.id = e.id
    ORDER BY e.id
    FOR UPDATE OF e
)
UPDATE entitlements e
SET distributions_used = e.distributions_used + w.n,
    status = CASE WHEN e.distributions_used + w.n >= e.max_distributions THEN 'exhausted' ELSE e.status END
FROM wanted w
WHERE e.id = w.id AND e.status = 'active'
  AND (e.expires_at IS NULL OR e.expires_at > wordclaw_now())
  AND (e.max_distributions IS NULL OR e.distributions_used + w.n <= e.max_distributions)
RETURNING e.id
"""

# Transition: (none) -> queued, for a plan and its whole fan-out, in one statement: the jobs
# arrive together or not at all, the insert trigger sends workers a single wake-up, and the
# caller gets the plan and its jobs back without reading them again (a round trip each). The
# plan is returned as inserted; its jobs' trigger sets its counters at the end of the
# statement, which leave a new plan 'queued'.
#
# The duplicate rule is checked in the same statement, after LOCK_PLAN_KEYS: a plan of the same
# tenant for the same item and any of these targets made in the last 5 minutes (unless its job
# for the target was cancelled) stops the insert, and is returned in `duplicates` instead of the
# plan. $9 true lets it through (allowDuplicate).
#
# $1 content item, $2 its version, $3 agent, $4 options, $5 max attempts, $6 target ids,
# $7 the plan's distinct payloads, each once, and $16 which one each target gets (1-based,
# parallel to $6): a megabyte's body to a hundred targets goes over the wire, and through the
# client's JSON encoder, once rather than a hundred times. $8 the jobs' priority: 1 for a plan someone is waiting on
# (awaitDelivery), else 0. $10 tenant, $11 idempotency key, $12 digest of the arguments,
# $13 each job's grant (parallel to $6; null where the agent created the item); $14 channel
# types and $15 decision codes (parallel to $6), logged as the plan's entitlement decisions.
CREATE_PLAN = f"""
WITH duplicates AS (
    SELECT p.id AS plan_id, array_agg(j.target_id ORDER BY j.position) AS target_ids
    FROM distribution_plans p
    JOIN distribution_jobs j ON j.plan_id = p.id
    WHERE NOT $9 AND p.content_item_id = $1 AND p.tenant_id = $10
      AND p.created_at > wordclaw_now() - interval '5 minutes'
      AND j.target_id = ANY ($6::uuid[]) AND j.status <> 'cancelled'
    GROUP BY p.id
), plan AS (
    INSERT INTO distribution_plans
        (content_item_id, content_version, created_by_agent_id, options, tenant_id, idempotency_key, request_digest)
    SELECT $1, $2, $3, $4, $10, $11, $12
    WHERE NOT EXISTS (SELECT 1 FROM duplicates)
    RETURNING {_PLAN_COLUMNS}
), jobs AS (
    INSERT INTO distribution_jobs
        (plan_id, target_id, position, max_attempts, payload_snapshot, priority, entitlement_id)
    SELECT plan.id, fanout.target_id, fanout.position, $5, ($7::jsonb[])[fanout.payload], $8, fanout.entitlement_id
    FROM plan, unnest($6::uuid[], $16::int[], $13::uuid[]) WITH ORDINALITY
        AS fanout (target_id, payload, entitlement_id, position)
    RETURNING {_JOB_COLUMNS}, position, entitlement_id
), decisions AS (
    INSERT INTO entitlement_decisions
        (tenant_id, agent_id, content_item_id, target_id, channel_type, stage, outcome, code, entitlement_id, plan_id,
         job_id)
    SELECT $10, $3, $1, jobs.target_id, d.channel_type, 'plan', 'allow', d.code, jobs.entitlement_id, plan.id, jobs.id
    FROM plan, jobs
    JOIN unnest($14::text[], $15::text[]) WITH ORDINALITY AS d (channel_type, code, position)
        ON d.position = jobs.position
)
SELECT plan.*, (SELECT jsonb_agg(to_jsonb(jobs) - 'position' - 'entitlement_id' ORDER BY position) FROM jobs) AS jobs,
       (SELECT jsonb_agg(jsonb_build_object('planId', plan_id, 'targetIds', target_ids)) FROM duplicates)
           AS duplicates
FROM (SELECT 1) AS one
LEFT JOIN plan ON true
"""

# Decisions that made no plan: a dry run's, and a refused plan's (kept although the plan is not).
# Parallel arrays from $5: target ids, channel types, outcomes, codes, grant ids.
LOG_DECISIONS = """
INSERT INTO entitlement_decisions
    (tenant_id, agent_id, content_item_id, stage, target_id, channel_type, outcome, code, entitlement_id)
SELECT $1, $2, $3, $4, d.target_id, d.channel_type, d.outcome, d.code, d.entitlement_id
FROM unnest($5::uuid[], $6::text[], $7::text[], $8::text[], $9::uuid[])
    AS d (target_id, channel_type, outcome, code, entitlement_id)
"""

GET_PLAN = f"SELECT {_PLAN_COLUMNS} FROM distribution_plans WHERE id = $1 AND tenant_id = $2"

GET_PLAN_STATUS = "SELECT status FROM distribution_plans WHERE id = $1 AND tenant_id = $2"

GET_PLAN_JOBS = f"""
SELECT {_JOB_COLUMNS}
FROM distribution_jobs
WHERE plan_id = $1
ORDER BY position, id
"""

GET_PLAN_RECEIPTS = """
SELECT r.id, r.job_id, j.target_id, r.attempt, r.succeeded, r.external_url, r.status_code,
       r.error_message, r.raw_meta, r.created_at
FROM distribution_receipts r
JOIN distribution_jobs j ON j.id = r.job_id
WHERE j.plan_id = $1
ORDER BY j.position, r.attempt, r.id
"""

# Transition: queued -> cancelled, in one statement. Running jobs keep their attempt but are
# marked, so a failure, a lost lease or a shutdown ends them cancelled instead of retrying.
# The jobs are locked (in id order) before the plan row, the order the job trigger takes them in,
# so a cancel and a worker recording the same plan's jobs cannot deadlock.
CANCEL_PLAN = """
WITH open_jobs AS (
    SELECT id FROM distribution_jobs
    WHERE plan_id = $1 AND status IN ('queued', 'running')
    ORDER BY id
    FOR UPDATE
), jobs AS (
    UPDATE distribution_jobs j
    SET status = CASE WHEN j.status = 'queued' THEN 'cancelled' ELSE j.status END,
        finished_at = CASE WHEN j.status = 'queued' THEN now() ELSE j.finished_at END,
        cancel_requested_at = coalesce(j.cancel_requested_at, now()),
        updated_at = now()
    FROM open_jobs
    WHERE j.id = open_jobs.id
    RETURNING j.id
)
UPDATE distribution_plans
SET cancel_requested_at = coalesce(cancel_requested_at, now())
WHERE id = $1 AND (SELECT count(*) FROM jobs) >= 0
"""

# Transition: failed -> queued, with a fresh attempt budget, for the failed jobs of a plan ($2),
# of a target ($3), or listed by id ($1): the dead letters, driven again. Attempt numbers go
# on from where they were, so every old receipt stays; the budget is what is added to
# max_attempts ($4). Jobs of an inactive target are left failed: they could never be claimed.
# A redrive is someone's word that the job may be sent again (they checked that an outcome
# unknown did not post), so what an earlier attempt may have sent is forgotten. That word is only
# taken for a job named by id: a redrive of a plan or a target leaves its DELIVERY_OUTCOME_UNKNOWN
# jobs failed, since an agent retrying a failed webhook must not post to X again.
REDRIVE_JOBS = """
WITH failed AS (
    SELECT j.id
    FROM distribution_jobs j JOIN distribution_targets t ON t.id = j.target_id
    WHERE t.active AND j.status = 'failed'
      AND (j.id = ANY ($1::uuid[])
           OR ((j.plan_id = $2 OR j.target_id = $3)
               AND coalesce(j.last_error, '') NOT LIKE 'DELIVERY_OUTCOME_UNKNOWN%'))
    ORDER BY j.id
    FOR UPDATE OF j
)
UPDATE distribution_jobs j
SET status = 'queued',
    max_attempts = j.attempt - j.throttles + $4,
    next_attempt_at = now(),
    throttled_since = NULL,
    maybe_sent_at = NULL,
    finished_at = NULL,
    updated_at = now()
FROM failed
WHERE j.id = failed.id AND j.status = 'failed'
RETURNING j.id
"""

# What a redrive that queued nothing named, to tell "nothing failed" from "no such id": $1 job
# ids, $2 plan, $3 target.
REDRIVE_SUBJECTS = """
SELECT EXISTS (SELECT 1 FROM distribution_plans WHERE id = $2) AS plan_exists,
       EXISTS (SELECT 1 FROM distribution_targets WHERE id = $3) AS target_exists,
       ARRAY(SELECT id FROM distribution_jobs WHERE id = ANY ($1::uuid[])) AS job_ids
"""

GET_JOBS = """
SELECT j.id, j.plan_id, j.status, j.target_id, t.active AS target_active
FROM distribution_jobs j JOIN distribution_targets t ON t.id = j.target_id
WHERE j.id = ANY ($1::uuid[])
"""

# --- agents and entitlements ------------------------------------------------------------------

_AGENT_COLUMNS = "id, name, tenant_id, scopes, key_prefix, created_at, revoked_at"

ENSURE_TENANT = "INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING"

# $1 name, $2 tenant, $3 scopes, $4 key prefix, $5 the key's SHA-256.
INSERT_AGENT = f"""
INSERT INTO agents (name, tenant_id, scopes, key_prefix, key_hash) VALUES ($1, $2, $3, $4, $5)
RETURNING {_AGENT_COLUMNS}
"""

# The agent a key's prefix names, with the hash to check the whole key against.
AGENT_BY_KEY_PREFIX = f"SELECT {_AGENT_COLUMNS}, key_hash FROM agents WHERE key_prefix = $1"

LIST_AGENTS = f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY created_at, name"

REVOKE_AGENT = f"""
UPDATE agents SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING {_AGENT_COLUMNS}
"""

GET_AGENT = f"SELECT {_AGENT_COLUMNS} FROM agents WHERE id = $1"

# An entitlement as it stands now: an active grant past its expiry is expired, and one whose
# budget is spent is exhausted, whatever the stored status still says.
_ENTITLEMENT_COLUMNS = """
    id, tenant_id, agent_id, content_item_id,
    CASE WHEN status = 'active' AND expires_at <= wordclaw_now() THEN 'expired'
         WHEN status = 'active' AND distributions_used >= max_distributions THEN 'exhausted'
         ELSE status END AS status,
    expires_at, allowed_channels, allow_redistribution, excerpt_only, max_excerpt_chars, max_distributions,
    distributions_used, created_at, revoked_at
"""

# $1 agent, $2 content item (null: all of the agent's tenant's items), $3 expiry, $4 channel types,
# $5 redistribution, $6 excerpt only, $7 excerpt length, $8 budget. The item must be the agent's
# tenant's: a grant never crosses tenants.
INSERT_ENTITLEMENT = f"""
INSERT INTO entitlements
    (tenant_id, agent_id, content_item_id, expires_at, allowed_channels, allow_redistribution, excerpt_only,
     max_excerpt_chars, max_distributions)
SELECT a.tenant_id, a.id, $2, $3, $4, $5, $6, $7, $8
FROM agents a
WHERE a.id = $1 AND ($2::uuid IS NULL OR EXISTS (
    SELECT 1 FROM content_items c WHERE c.id = $2 AND c.tenant_id = a.tenant_id))
RETURNING {_ENTITLEMENT_COLUMNS}
"""

# An agent's grants ($1; null: everyone's), newest first.
LIST_ENTITLEMENTS = f"""
SELECT {_ENTITLEMENT_COLUMNS} FROM entitlements WHERE $1::uuid IS NULL OR agent_id = $1 ORDER BY created_at DESC, id
"""

# An agent's grants over one content item: those for the item, then those for all items; newest first.
ENTITLEMENTS_FOR_ITEM = f"""
SELECT {_ENTITLEMENT_COLUMNS} FROM entitlements
WHERE agent_id = $1 AND (content_item_id = $2 OR content_item_id IS NULL)
ORDER BY content_item_id IS NULL, created_at DESC, id
"""

GET_ENTITLEMENTS = f"SELECT {_ENTITLEMENT_COLUMNS} FROM entitlements WHERE id = ANY ($1::uuid[])"

# Queued jobs that rely on the grant fail at their next claim (LOG_DELIVERY_DECISIONS, CLAIM_JOBS).
REVOKE_ENTITLEMENT = f"""
UPDATE entitlements SET status = 'revoked', revoked_at = coalesce(revoked_at, now()) WHERE id = $1
RETURNING {_ENTITLEMENT_COLUMNS}
"""

# --- worker -----------------------------------------------------------------------------------

# Transition: queued -> running, for a batch, in one statement. Targets with a limit
# (max_concurrency, rate_per_minute) get only the room their limits leave, and spend tokens for
# what starts; no worker sleeps for a limit: a job that may not start yet is not claimed. For
# the others, jobs someone is waiting on (priority 1) come first, then the longest due; half of
# each claim is reserved for first attempts, so a wave of retries never starves fresh work. Each
# part walks a partial index in (priority, next_attempt_at) order (distribution_jobs_target_queue,
# distribution_jobs_claim_fresh, distribution_jobs_claim), and SKIP LOCKED lets workers claim
# side by side.
#
# The claim's token ($4, new for every claim: the worker makes it) goes on each job it takes, and
# every later write about these attempts names it. The claim commits durably: a claim that a
# server crash could undo would let the job be claimed again under the same attempt number while
# the first worker still delivers it.
CLAIM_JOBS = """
WITH locked_targets AS (
    -- Targets with a limit, locked for this claim so that two workers never both fill the same
    -- room; one that another worker is claiming for is skipped this round.
    SELECT t.id, t.max_concurrency, t.rate_per_minute, t.rate_tokens, t.rate_updated_at
    FROM distribution_targets t
    WHERE (t.max_concurrency IS NOT NULL OR t.rate_per_minute IS NOT NULL)
      AND t.active
      AND (t.suspended_until IS NULL OR t.suspended_until <= now())
    FOR NO KEY UPDATE OF t SKIP LOCKED
), limited AS (
    -- room is how many of a target's jobs may start now: the free concurrency, and the whole
    -- tokens in its bucket. Its running jobs are counted once the target is locked, in a
    -- snapshot of their own (wordclaw_running_jobs): this statement's snapshot, older than the
    -- lock, would miss the jobs another worker claimed and committed just before.
    SELECT l.id, b.tokens,
           least(CASE WHEN l.max_concurrency IS NULL THEN $1
                      ELSE l.max_concurrency - wordclaw_running_jobs(l.id) END,
                 coalesce(floor(b.tokens), $1))::int AS room
    FROM locked_targets l
    CROSS JOIN LATERAL (
        SELECT least(l.rate_per_minute, coalesce(l.rate_tokens, l.rate_per_minute)
                     + extract(epoch FROM now() - coalesce(l.rate_updated_at, now())) * l.rate_per_minute / 60)
            AS tokens
    ) b
), limited_jobs AS (
    SELECT x.id, l.id AS target_id
    FROM limited l
    CROSS JOIN LATERAL (
        SELECT j.id
        FROM distribution_jobs j
        WHERE j.target_id = l.id AND j.status = 'queued' AND j.next_attempt_at <= now()
        ORDER BY j.priority DESC, j.next_attempt_at
        LIMIT greatest(l.room, 0)
        FOR UPDATE OF j SKIP LOCKED
    ) x
    LIMIT $1
), spent AS (
    UPDATE distribution_targets t
    SET rate_tokens = l.tokens - c.started, rate_updated_at = now()
    FROM limited l
    JOIN (SELECT target_id, count(*) AS started FROM limited_jobs GROUP BY target_id) c ON c.target_id = l.id
    WHERE t.id = l.id AND t.rate_per_minute IS NOT NULL
), fresh AS (
    SELECT j.id
    FROM distribution_jobs j
    JOIN distribution_targets t ON t.id = j.target_id
    WHERE j.status = 'queued' AND j.attempt = 0
      AND j.next_attempt_at <= now()
      AND t.active
      AND (t.suspended_until IS NULL OR t.suspended_until <= now())
      AND t.max_concurrency IS NULL AND t.rate_per_minute IS NULL
    ORDER BY j.priority DESC, j.next_attempt_at
    LIMIT ($1 - (SELECT count(*) FROM limited_jobs) + 1) / 2
    FOR UPDATE OF j SKIP LOCKED
), rest AS (
    SELECT j.id
    FROM distribution_jobs j
    JOIN distribution_targets t ON t.id = j.target_id
    WHERE j.status = 'queued'
      AND j.next_attempt_at <= now()
      AND t.active
      AND (t.suspended_until IS NULL OR t.suspended_until <= now())
      AND t.max_concurrency IS NULL AND t.rate_per_minute IS NULL
      AND j.id NOT IN (SELECT id FROM fresh)
    ORDER BY j.priority DESC, j.next_attempt_at
    LIMIT $1 - (SELECT count(*) FROM limited_jobs) - (SELECT count(*) FROM fresh)
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE distribution_jobs j
SET status = 'running',
    attempt = j.attempt + 1,
    lease_expires_at = now() + make_interval(secs => $2),
    locked_by = $3,
    claim_token = $4,
    claimed_at = now(),
    sending_at = NULL,
    updated_at = now()
FROM distribution_targets t
-- An array, not a join: the planner cannot size the computed LIMITs, and a join planned for
-- its guess hashes the whole jobs table; ids in an array are fetched through the primary key.
WHERE j.id = ANY (ARRAY(SELECT id FROM limited_jobs UNION ALL SELECT id FROM fresh UNION ALL SELECT id FROM rest))
  AND t.id = j.target_id
RETURNING j.id, j.plan_id, j.target_id, j.attempt, j.max_attempts, j.priority, j.payload_snapshot,
          t.name AS target_name, t.channel_type, t.config_json AS config, t.secret_ciphertext, j.entitlement_id,
          j.claim_token, t.private_addresses_allowed,
          -- How long ago (on the database's clock) an attempt may first have reached the channel.
          extract(epoch FROM now() - j.maybe_sent_at)::float8 AS maybe_sent_seconds_ago,
          -- Whether a success should reset the target's 429 back-off (RESET_TARGET_BACKOFF).
          t.throttle_backoff_seconds IS NOT NULL AS target_backing_off,
          -- The grant the job was allowed by, checked again now: revoked or expired since, it is
          -- not sent. Spent to the last (exhausted) is fine: this job's share was spent for it.
          CASE WHEN j.entitlement_id IS NOT NULL THEN (
              SELECT CASE WHEN e.status = 'revoked' THEN 'ENTITLEMENT_REVOKED'
                          WHEN e.status = 'expired' OR e.expires_at <= wordclaw_now() THEN 'ENTITLEMENT_EXPIRED' END
              FROM entitlements e WHERE e.id = j.entitlement_id)
          END AS denied
"""

# The entitlement decisions a worker made on claiming jobs that rely on a grant: parallel arrays
# of job ids ($1) and denial codes ($2, null: allowed).
LOG_DELIVERY_DECISIONS = """
INSERT INTO entitlement_decisions
    (tenant_id, agent_id, content_item_id, target_id, channel_type, stage, outcome, code, entitlement_id, plan_id,
     job_id)
SELECT p.tenant_id, p.created_by_agent_id, p.content_item_id, j.target_id, t.channel_type, 'delivery',
       CASE WHEN d.code IS NULL THEN 'allow' ELSE 'deny' END, coalesce(d.code, 'ENTITLED'), j.entitlement_id,
       p.id, j.id
FROM unnest($1::uuid[], $2::text[]) AS d (job_id, code)
JOIN distribution_jobs j ON j.id = d.job_id
JOIN distribution_plans p ON p.id = j.plan_id
JOIN distribution_targets t ON t.id = j.target_id
"""

# Transition: running -> queued | failed | cancelled for attempts whose lease ran out: the
# worker was killed or lost its database. The attempt's outcome is unknown, so it counts, and
# gets a receipt (unless its late result got there first). Any rescued attempt may have reached
# its channel, so maybe_sent_at is set from its claim's time; one that had begun sending to a
# channel that cannot take a request twice (sending_at) ends failed, as it may have been posted.
# $1 batch size, $2 the receipt's text, $3 last_error when the target was deactivated, $4 last_error
# and receipt when the attempt may have been posted.
RESCUE_EXPIRED_LEASES = """
WITH lost AS (
    UPDATE distribution_jobs j
    SET status = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                      WHEN j.sending_at IS NOT NULL OR NOT t.active OR j.attempt - j.throttles >= j.max_attempts
                          THEN 'failed'
                      ELSE 'queued' END,
        next_attempt_at = now(),
        lease_expires_at = NULL,
        locked_by = NULL,
        claim_token = NULL,
        sending_at = NULL,
        maybe_sent_at = coalesce(j.maybe_sent_at, j.claimed_at, now()),
        last_error = CASE WHEN j.cancel_requested_at IS NOT NULL THEN $2
                          WHEN j.sending_at IS NOT NULL THEN $4
                          WHEN t.active THEN $2
                          ELSE $3 END,
        finished_at = CASE WHEN j.cancel_requested_at IS NULL AND j.sending_at IS NULL AND t.active
                                AND j.attempt - j.throttles < j.max_attempts
                           THEN NULL ELSE now() END,
        updated_at = now()
    FROM distribution_targets t
    WHERE t.id = j.target_id AND j.id IN (
        SELECT id FROM distribution_jobs
        WHERE status = 'running' AND lease_expires_at < now()
        ORDER BY lease_expires_at
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    )
    RETURNING j.id, j.attempt, j.last_error
)
INSERT INTO distribution_receipts (job_id, attempt, succeeded, error_message)
SELECT id, attempt, false, CASE WHEN last_error = $4 THEN $4 ELSE $2 END FROM lost
ON CONFLICT (job_id, attempt) DO NOTHING
RETURNING job_id
"""

# Durably, before a channel that cannot take a request twice (X) is sent this attempt: a rescue
# then knows the attempt may have reached the channel. No row: the claim is no longer this
# worker's (its lease ran out), so it must not send. A plan cancelled meanwhile (the worker may
# not have heard: a notification can be lost) is not marked, and says so: nothing is sent.
MARK_SENDING = """
UPDATE distribution_jobs SET sending_at = CASE WHEN cancel_requested_at IS NULL THEN now() END
WHERE id = $1 AND claim_token = $2 AND status = 'running'
RETURNING cancel_requested_at IS NOT NULL AS cancelled
"""

# Transition: running -> succeeded | queued (retry or throttled) | failed | cancelled, with each
# attempt's receipt, for a batch of attempts in one statement (one commit, one trigger firing
# per batch).
#
# Every outcome names its claim: only the claim that holds the job moves it. A write repeated
# after a lost commit acknowledgement, or a late result after a rescue (the job perhaps claimed
# again since), meets a job that moved on: the first receipt stays ((job_id, attempt) is unique)
# and nothing moves, except that a late success upgrades the rescue's "outcome unknown" receipt
# and ends the job succeeded, because the content really was delivered and must not be sent
# again.
# A released attempt (never started) sent nothing: it is requeued without counting and without
# a receipt. A throttled attempt is requeued for when its target's suspension ends
# (THROTTLE_TARGET, in the same transaction, set it) and does not spend the budget: attempt -
# throttles is what counts against max_attempts. A job throttled for longer than the limit fails.
#
# An attempt that may have reached its channel sets maybe_sent_at (from its claim's time). On a
# channel whose idempotency key lasts only so long (a resend window, in seconds), a retry is
# scheduled no later than a minute before the window closes, and a retry that would fall after
# that fails the job with DELIVERY_OUTCOME_UNKNOWN instead: sending it then could post twice.
#
# Parallel arrays: $1 job ids, $2 claim tokens, $3 attempts, $4 succeeded, $5 external URLs,
# $6 status codes, $7 errors, $8 raw metadata, $9 retryable, $10 retry delays in seconds,
# $11 released, $12 throttled until (null: not throttled), $13 may have reached the channel,
# $14 resend windows in seconds (null: no limit).
# $15 is last_error for a job failed because its target was deactivated; $16 the longest a job
# may stay throttled, in seconds; $17 last_error for a job throttled longer than that; $18
# last_error for a retry that would fall outside its resend window.
RECORD_ATTEMPTS = """
WITH outcome AS (
    SELECT *
    FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::bool[], $5::text[], $6::int[], $7::text[], $8::jsonb[],
                $9::bool[], $10::float8[], $11::bool[], $12::timestamptz[], $13::bool[], $14::float8[])
        AS o (job_id, claim_token, attempt, succeeded, external_url, status_code, error, raw_meta, retryable, delay,
              released, throttled_until, maybe_sent, resend_window)
), receipt AS (
    INSERT INTO distribution_receipts AS r
        (job_id, attempt, succeeded, external_url, status_code, error_message, raw_meta)
    SELECT job_id, attempt, succeeded, external_url, status_code, error, raw_meta
    FROM outcome WHERE NOT released
    ON CONFLICT (job_id, attempt) DO UPDATE
    SET succeeded = true, external_url = excluded.external_url, status_code = excluded.status_code,
        error_message = excluded.error_message, raw_meta = excluded.raw_meta
    WHERE NOT r.succeeded AND excluded.succeeded
), locked AS (
    -- Locked, in id order, before deciding: the decision reads the job's current state
    -- (a cancel request may have just committed), and batches never deadlock each other.
    SELECT o.*, j.status AS job_status, j.claim_token AS job_claim_token, j.max_attempts, j.throttles,
           j.throttled_since, j.cancel_requested_at IS NOT NULL AS cancel_requested, t.active AS target_active,
           j.attempt AS job_attempt,
           -- When a resend may last be sent, for a channel whose idempotency key expires.
           CASE WHEN o.resend_window IS NOT NULL THEN
               coalesce(j.maybe_sent_at, CASE WHEN o.maybe_sent THEN j.claimed_at END)
                   + make_interval(secs => o.resend_window)
           END AS window_ends
    FROM outcome o
    JOIN distribution_jobs j ON j.id = o.job_id
    JOIN distribution_targets t ON t.id = j.target_id
    ORDER BY j.id
    FOR UPDATE OF j
), timed AS (
    SELECT *, job_status = 'running' AND job_claim_token = claim_token AS on_time,
           coalesce(throttled_since, now()) < now() - make_interval(secs => $16) AS too_long,
           least(now() + make_interval(secs => delay), window_ends - interval '1 minute') AS retry_at
    FROM locked
), windowed AS (
    SELECT *, retry_at >= now() AS in_window, job_attempt - throttles < max_attempts AS budget_left FROM timed
), decided AS (
    SELECT job_id, error, retry_at, maybe_sent, released AND on_time AS released, on_time, throttled_until,
           CASE WHEN NOT on_time THEN CASE WHEN succeeded AND job_status <> 'succeeded' THEN 'succeeded' END
                WHEN succeeded THEN 'succeeded'
                WHEN cancel_requested THEN 'cancelled'
                WHEN NOT target_active THEN 'failed'
                WHEN released THEN 'queued'
                WHEN throttled_until IS NOT NULL THEN CASE WHEN too_long THEN 'failed' ELSE 'queued' END
                WHEN retryable AND budget_left AND in_window THEN 'queued'
                ELSE 'failed' END AS status,
           CASE WHEN NOT on_time OR succeeded OR cancel_requested THEN NULL
                -- Only an attempt that would have been tried again: a final one keeps its own reason
                -- (DELIVERY_OUTCOME_UNKNOWN above all: it may have posted).
                WHEN NOT target_active AND (retryable OR released OR throttled_until IS NOT NULL) THEN $15
                WHEN released THEN NULL
                WHEN throttled_until IS NOT NULL THEN CASE WHEN too_long THEN $17 END
                WHEN retryable AND budget_left AND NOT in_window THEN $18
           END AS reason,
           on_time AND throttled_until IS NOT NULL AND NOT succeeded AS throttled
    FROM windowed
)
UPDATE distribution_jobs j
SET status = d.status,
    attempt = CASE WHEN d.released THEN j.attempt - 1 ELSE j.attempt END,
    throttles = CASE WHEN d.throttled AND d.status = 'queued' THEN j.throttles + 1 ELSE j.throttles END,
    throttled_since = CASE WHEN d.throttled THEN coalesce(j.throttled_since, now()) END,
    next_attempt_at = CASE WHEN d.status <> 'queued' THEN j.next_attempt_at
                           WHEN d.throttled THEN d.throttled_until
                           ELSE d.retry_at END,
    last_error = CASE WHEN d.reason IS NOT NULL THEN d.reason WHEN d.on_time THEN d.error END,
    maybe_sent_at = CASE WHEN d.on_time AND d.maybe_sent THEN coalesce(j.maybe_sent_at, j.claimed_at)
                         ELSE j.maybe_sent_at END,
    lease_expires_at = NULL,
    locked_by = NULL,
    claim_token = NULL,
    sending_at = NULL,
    finished_at = CASE WHEN d.status = 'queued' THEN NULL ELSE now() END,
    updated_at = now()
FROM decided d
WHERE j.id = d.job_id AND d.status IS NOT NULL
RETURNING j.id, j.status
"""

# Statements that change targets change one row each, and a caller with several targets runs
# them in id order. A statement that first locked target rows (SELECT ... FOR NO KEY UPDATE) and
# then updated them could deadlock: when a row changed after the statement's snapshot, the UPDATE
# comes back to the old version, and the key-share locks new plans' jobs take on their targets
# (the foreign key) can make it queue for that version's tuple lock behind a transaction that
# waits for it.

# A success resets its target's 429 back-off. Its own statement, after the outcome is written:
# a statement that holds jobs must never wait for a target (the lock order is targets, then jobs).
RESET_TARGET_BACKOFF = """
UPDATE distribution_targets SET throttle_backoff_seconds = NULL WHERE id = $1 AND throttle_backoff_seconds IS NOT NULL
"""

# Suspend a target that throttled attempts ($1), before RECORD_ATTEMPTS requeues their jobs, in
# the same transaction: targets first, then the jobs. A named time ($2 seconds, the longest any
# attempt was given: Retry-After, a rate-limit reset) is kept as given; a 429 that named none
# ($3) doubles the target's back-off, from 1 s up to $4 seconds. Returns when the target may be
# tried again.
THROTTLE_TARGET = """
UPDATE distribution_targets t
SET throttle_backoff_seconds = CASE WHEN $3 THEN least(coalesce(t.throttle_backoff_seconds * 2, 1), $4)
                                    ELSE t.throttle_backoff_seconds END,
    suspended_until = greatest(
        t.suspended_until,
        now() + make_interval(secs => greatest(
            coalesce($2::float8, 0),
            CASE WHEN $3 THEN least(coalesce(t.throttle_backoff_seconds * 2, 1), $4) ELSE 0 END))
    ),
    updated_at = now()
WHERE t.id = $1
RETURNING t.suspended_until
"""

# A target that answered 410 Gone is deactivated; the deactivation trigger fails its queued jobs
# with TARGET_GONE ($2). Its own transaction, after the outcome that said so is written.
DEACTIVATE_GONE_TARGET = """
UPDATE distribution_targets SET active = false, deactivated_reason = $2, updated_at = now() WHERE id = $1 AND active
"""

# --- leases and workers -------------------------------------------------------------------------

# A worker's heartbeat, one statement: its row in workers, and the leases of the attempts it
# holds, given as parallel arrays of job ids ($1) and claim tokens ($2). A lease it no longer
# holds (rescued, and perhaps claimed by another worker) is not returned; one whose plan was
# cancelled says so, in case the notification was lost. The jobs are locked in id order, as
# every statement locks them.
HEARTBEAT = """
WITH me AS (
    INSERT INTO workers (name, host, pid, concurrency)
    VALUES ($3, $4, $5, $6)
    ON CONFLICT (name) DO UPDATE SET heartbeat_at = now(), concurrency = excluded.concurrency
), held AS (
    SELECT j.id
    FROM unnest($1::uuid[], $2::uuid[]) AS h (id, claim_token)
    JOIN distribution_jobs j ON j.id = h.id
    WHERE j.claim_token = h.claim_token AND j.status = 'running'
    ORDER BY j.id
    FOR NO KEY UPDATE OF j
)
UPDATE distribution_jobs j
SET lease_expires_at = now() + make_interval(secs => $7)
FROM held
WHERE j.id = held.id
RETURNING j.id, j.cancel_requested_at IS NOT NULL AS cancel_requested
"""

DEREGISTER_WORKER = "DELETE FROM workers WHERE name = $1"

# Rows of workers that stopped without deregistering (killed): silent for $1 seconds.
PRUNE_WORKERS = "DELETE FROM workers WHERE heartbeat_at < now() - make_interval(secs => $1)"

LIST_WORKERS = """
SELECT name, host, pid, concurrency, started_at, heartbeat_at FROM workers ORDER BY started_at, name
"""

# --- retention --------------------------------------------------------------------------------
#
# Pruning in batches: each statement picks at most $limit rows in age order, skipping rows that
# another transaction holds (SKIP LOCKED), so it never waits on a worker and holds its own locks
# only for one short transaction. wordclaw_mcp/retention.py loops until a batch comes back short.
# Ages are seconds, measured on the database's clock. The picked ids go to the DELETE as an array,
# so it finds them by primary key whatever the planner guesses about the batch's size.

# Finished jobs of one status whose finished_at is older than the age, with their receipts (ON
# DELETE CASCADE), walking the partial index distribution_jobs_finished. Only jobs of final plans:
# a plan's status is final exactly when none of its jobs is queued or running (the job trigger
# keeps it so), and the plan row is locked with the job. The trigger locks the plan before it
# recomputes the status, so a job that moves (a late success, a redrive) either waits for this
# transaction or, having committed first, makes the plan non-final and its jobs are left alone.
# Returns the jobs and receipts deleted and the plans they belonged to, for PRUNE_EMPTIED_PLANS
# in the same transaction.
PRUNE_FINISHED_JOBS = """
WITH deleted AS (
    DELETE FROM distribution_jobs
    WHERE id = ANY (ARRAY(
        SELECT j.id
        FROM distribution_jobs j
        JOIN distribution_plans p ON p.id = j.plan_id
        WHERE j.status = $1
          AND j.finished_at < now() - make_interval(secs => $2)
          AND p.status NOT IN ('queued', 'running')
        ORDER BY j.finished_at
        LIMIT $3
        FOR UPDATE OF j, p SKIP LOCKED
    ))
    RETURNING id, plan_id
)
SELECT count(*) AS jobs,
       (SELECT count(*) FROM distribution_receipts WHERE job_id = ANY (ARRAY(SELECT id FROM deleted))) AS receipts,
       coalesce(array_agg(DISTINCT plan_id), '{}') AS plan_ids
FROM deleted
"""

# The plans PRUNE_FINISHED_JOBS just took jobs from ($1, already locked by this transaction) that
# are final and have no job left. It runs as a second statement so that it sees the deletions.
PRUNE_EMPTIED_PLANS = """
WITH deleted AS (
    DELETE FROM distribution_plans p
    WHERE p.id = ANY ($1::uuid[])
      AND p.status NOT IN ('queued', 'running')
      AND NOT EXISTS (SELECT 1 FROM distribution_jobs j WHERE j.plan_id = p.id)
    RETURNING p.id
)
SELECT count(*) FROM deleted
"""

# Entitlement decisions older than the age ($1 seconds), oldest first, through
# entitlement_decisions_created. Nothing else refers to them, so nothing else is locked or kept.
PRUNE_DECISIONS = """
WITH deleted AS (
    DELETE FROM entitlement_decisions
    WHERE id = ANY (ARRAY(
        SELECT id FROM entitlement_decisions
        WHERE created_at < now() - make_interval(secs => $1)
        ORDER BY created_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING 1
)
SELECT count(*) FROM deleted
"""

# Outbox events older than the age, walking distribution_events_created, except those of a plan
# that still has a queued or running job: a live plan keeps its whole history. The plan is looked
# up by a scalar subquery, one primary-key probe per candidate, rather than joined, which would
# let the planner scan every plan for the live ones. An event whose plan is gone has no plan row.
PRUNE_EVENTS = """
WITH deleted AS (
    DELETE FROM distribution_events
    WHERE id = ANY (ARRAY(
        SELECT e.id
        FROM distribution_events e
        WHERE e.created_at < now() - make_interval(secs => $1)
          AND coalesce((SELECT p.status FROM distribution_plans p WHERE p.id = e.plan_id), 'deleted')
              NOT IN ('queued', 'running')
        ORDER BY e.created_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING 1
)
SELECT count(*) FROM deleted
"""

# --- keys -------------------------------------------------------------------------------------
#
# Every stored ciphertext, read in keyset-paginated batches ordered by the row's id (a target's,
# which is also a session's primary key): $1 is the last id of the previous batch (the nil UUID
# for the first, which no target has), $2 the batch size. wordclaw_mcp/keys.py verifies them at
# start and reseals them under the first key (``wordclaw keys rotate``).

STORED_SECRET_COUNTS = """
SELECT (SELECT count(*) FROM distribution_targets WHERE secret_ciphertext IS NOT NULL) AS targets,
       (SELECT count(*) FROM channel_sessions) AS sessions
"""

# Verification reads without locking; the target's name is for the error message.
TARGET_CIPHERTEXTS = """
SELECT id, name, secret_ciphertext AS ciphertext FROM distribution_targets
WHERE secret_ciphertext IS NOT NULL AND id > $1
ORDER BY id
LIMIT $2
"""

SESSION_CIPHERTEXTS = """
SELECT s.target_id AS id, t.name, s.ciphertext
FROM channel_sessions s JOIN distribution_targets t ON t.id = s.target_id
WHERE s.target_id > $1
ORDER BY s.target_id
LIMIT $2
"""

# A rotation batch locks its rows and reads them as they are once locked, so that a secret
# written meanwhile (rotate_target_secret, a refreshed session) is the one resealed, and one
# written after waits for the batch's commit and then replaces it. FOR NO KEY UPDATE, the lock
# the UPDATE takes anyway, rather than FOR UPDATE: it does not block the key-share locks that
# inserting a job (its foreign key to the target) takes. A row whose secrets were cleared
# meanwhile drops out, so a batch may come back short before the end: the loop stops on an
# empty one.
LOCK_TARGET_CIPHERTEXTS = """
SELECT id, secret_ciphertext AS ciphertext FROM distribution_targets
WHERE secret_ciphertext IS NOT NULL AND id > $1
ORDER BY id
LIMIT $2
FOR NO KEY UPDATE
"""

LOCK_SESSION_CIPHERTEXTS = """
SELECT target_id AS id, ciphertext FROM channel_sessions
WHERE target_id > $1
ORDER BY target_id
LIMIT $2
FOR NO KEY UPDATE
"""

# A batch written back in one statement: ids $1 and their new ciphertexts $2, pairwise, and for
# targets the fingerprints $3 (keyed by the first key, so they change with it). The secrets
# themselves are unchanged, so updated_at is left alone.
RESEAL_TARGET_CIPHERTEXTS = """
UPDATE distribution_targets t SET secret_ciphertext = r.ciphertext, secret_fingerprint = r.fingerprint
FROM unnest($1::uuid[], $2::bytea[], $3::text[]) AS r (id, ciphertext, fingerprint)
WHERE t.id = r.id
"""

RESEAL_SESSION_CIPHERTEXTS = """
UPDATE channel_sessions s SET ciphertext = r.ciphertext
FROM unnest($1::uuid[], $2::bytea[]) AS r (id, ciphertext)
WHERE s.target_id = r.id
"""
