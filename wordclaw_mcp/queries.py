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

_CONTENT_COLUMNS = """
    id, title, body_markdown AS body, summary, canonical_url, metadata, version, created_at, updated_at
"""

INSERT_CONTENT_ITEM = f"""
INSERT INTO content_items (title, body_markdown, summary, canonical_url, metadata)
VALUES ($1, $2, $3, $4, $5)
RETURNING {_CONTENT_COLUMNS}
"""

UPDATE_CONTENT_ITEM = f"""
UPDATE content_items
SET title = $2, body_markdown = $3, summary = $4, canonical_url = $5, metadata = $6,
    version = version + 1, updated_at = now()
WHERE id = $1
RETURNING {_CONTENT_COLUMNS}
"""

GET_CONTENT_ITEM = f"SELECT {_CONTENT_COLUMNS} FROM content_items WHERE id = $1"

# --- targets ----------------------------------------------------------------------------------

_TARGET_COLUMNS = """
    id, name, channel_type, config_json AS config, secret_ciphertext IS NOT NULL AS has_secrets,
    active, suspended_until, created_at
"""

INSERT_TARGET = f"""
INSERT INTO distribution_targets (name, channel_type, config_json, secret_ciphertext)
VALUES ($1, $2, $3, $4)
ON CONFLICT (name) DO NOTHING
RETURNING {_TARGET_COLUMNS}
"""

LIST_TARGETS = f"SELECT {_TARGET_COLUMNS} FROM distribution_targets ORDER BY created_at, name"

GET_TARGETS = f"SELECT {_TARGET_COLUMNS} FROM distribution_targets WHERE id = ANY($1::uuid[])"

# --- plans ------------------------------------------------------------------------------------

_PLAN_COLUMNS = "id, content_item_id, content_version, status, created_at, completed_at, cancel_requested_at"

INSERT_PLAN = f"""
INSERT INTO distribution_plans (content_item_id, content_version, created_by_agent_id, options)
VALUES ($1, $2, $3, $4)
RETURNING {_PLAN_COLUMNS}
"""

# One statement for the whole fan-out: the jobs arrive together or not at all, and the insert
# trigger sends workers a single wake-up.
INSERT_JOBS = """
INSERT INTO distribution_jobs (plan_id, target_id, position, max_attempts, payload_snapshot)
SELECT $1, target_id, position, $2, payload
FROM unnest($3::uuid[], $4::jsonb[]) WITH ORDINALITY AS fanout (target_id, payload, position)
"""

GET_PLAN = f"SELECT {_PLAN_COLUMNS} FROM distribution_plans WHERE id = $1"

GET_PLAN_STATUS = "SELECT status FROM distribution_plans WHERE id = $1"

GET_PLAN_JOBS = """
SELECT id, target_id, status, attempt, max_attempts, next_attempt_at, last_error, updated_at
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

# --- worker -----------------------------------------------------------------------------------

# Transition: queued -> running, for a batch. The inner SELECT walks the partial index
# distribution_jobs_claim in next_attempt_at order; SKIP LOCKED lets workers claim side by side.
CLAIM_JOBS = """
WITH due AS (
    SELECT j.id
    FROM distribution_jobs j
    JOIN distribution_targets t ON t.id = j.target_id
    WHERE j.status = 'queued'
      AND j.next_attempt_at <= now()
      AND t.active
      AND (t.suspended_until IS NULL OR t.suspended_until <= now())
    ORDER BY j.next_attempt_at
    LIMIT $1
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE distribution_jobs j
SET status = 'running',
    attempt = j.attempt + 1,
    lease_expires_at = now() + make_interval(secs => $2),
    locked_by = $3,
    updated_at = now()
FROM due, distribution_targets t
WHERE j.id = due.id AND t.id = j.target_id
RETURNING j.id, j.plan_id, j.target_id, j.attempt, j.max_attempts, j.payload_snapshot,
          t.name AS target_name, t.channel_type, t.config_json AS config, t.secret_ciphertext
"""

# Transition: running -> queued | failed | cancelled for attempts whose lease ran out: the
# worker was killed or lost its database. The attempt's outcome is unknown, so it counts, and
# gets a receipt (unless its late result got there first).
RESCUE_EXPIRED_LEASES = """
WITH lost AS (
    UPDATE distribution_jobs j
    SET status = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                      WHEN NOT t.active OR j.attempt >= j.max_attempts THEN 'failed'
                      ELSE 'queued' END,
        next_attempt_at = now(),
        lease_expires_at = NULL,
        locked_by = NULL,
        last_error = CASE WHEN t.active OR j.cancel_requested_at IS NOT NULL THEN $2
                          ELSE $3 END,
        finished_at = CASE WHEN j.cancel_requested_at IS NULL AND t.active AND j.attempt < j.max_attempts
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
    RETURNING j.id, j.attempt
)
INSERT INTO distribution_receipts (job_id, attempt, succeeded, error_message)
SELECT id, attempt, false, $2 FROM lost
ON CONFLICT (job_id, attempt) DO NOTHING
RETURNING job_id
"""

# Transition: running -> succeeded | queued (retry) | failed | cancelled, with each attempt's
# receipt, for a batch of attempts in one statement (one commit, one trigger firing per batch).
#
# Safe to repeat: when a commit's acknowledgement is lost the worker writes the batch again,
# and (job_id, attempt) is unique, so the first receipt stays and the guards below miss.
# A result whose job moved on (cancelled, or rescued and perhaps re-claimed) is late: it moves
# nothing, except that a late success upgrades the rescue's "outcome unknown" receipt and ends
# the job succeeded, because the content really was delivered and must not be sent again.
# A released attempt (this worker cannot decrypt the target's secrets) sent nothing: it is
# requeued without counting and without a receipt, for a worker that holds the right key.
#
# Parallel arrays: $1 job ids, $2 attempts, $3 succeeded, $4 external URLs, $5 status codes,
# $6 errors, $7 raw metadata, $8 retryable, $9 retry delays in seconds, $10 released.
# $11 is last_error for a job failed because its target was deactivated.
RECORD_ATTEMPTS = """
WITH outcome AS (
    SELECT *
    FROM unnest($1::uuid[], $2::int[], $3::bool[], $4::text[], $5::int[], $6::text[], $7::jsonb[],
                $8::bool[], $9::float8[], $10::bool[])
        AS o (job_id, attempt, succeeded, external_url, status_code, error, raw_meta, retryable, delay,
              released)
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
    SELECT o.*, j.status AS job_status, j.attempt AS job_attempt, j.max_attempts,
           j.cancel_requested_at IS NOT NULL AS cancel_requested, t.active AS target_active
    FROM outcome o
    JOIN distribution_jobs j ON j.id = o.job_id
    JOIN distribution_targets t ON t.id = j.target_id
    ORDER BY j.id
    FOR UPDATE OF j
), decided AS (
    SELECT job_id, error, delay, released AND on_time AS released, on_time,
           CASE WHEN NOT on_time THEN CASE WHEN succeeded AND job_status <> 'succeeded' THEN 'succeeded' END
                WHEN succeeded THEN 'succeeded'
                WHEN cancel_requested THEN 'cancelled'
                WHEN NOT target_active THEN 'failed'
                WHEN released THEN 'queued'
                WHEN retryable AND job_attempt < max_attempts THEN 'queued'
                ELSE 'failed' END AS status,
           on_time AND NOT succeeded AND NOT cancel_requested AND NOT target_active AS target_gone
    FROM (SELECT *, job_status = 'running' AND job_attempt = attempt AS on_time FROM locked) l
)
UPDATE distribution_jobs j
SET status = d.status,
    attempt = CASE WHEN d.released THEN j.attempt - 1 ELSE j.attempt END,
    next_attempt_at = CASE WHEN d.status = 'queued' THEN now() + make_interval(secs => d.delay)
                           ELSE j.next_attempt_at END,
    last_error = CASE WHEN d.target_gone THEN $11 WHEN d.on_time THEN d.error END,
    lease_expires_at = NULL,
    locked_by = NULL,
    finished_at = CASE WHEN d.status = 'queued' THEN NULL ELSE now() END,
    updated_at = now()
FROM decided d
WHERE j.id = d.job_id AND d.status IS NOT NULL
RETURNING j.id, j.status
"""

# Whether this worker's keys can read what is stored: checked before a worker starts.
TARGET_SECRETS = """
SELECT id, name, secret_ciphertext FROM distribution_targets
WHERE active AND secret_ciphertext IS NOT NULL
ORDER BY created_at DESC
LIMIT $1
"""
