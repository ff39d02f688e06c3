-- 0012: who may publish what: tenants, agents and their keys, entitlements, the decision log,
-- the duplicate rule's index, and the clock the rules read.

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
-- belong to their plan's. Rows made before tenants existed belong to the default tenant and
-- to the local agent.
ALTER TABLE content_items ADD COLUMN IF NOT EXISTS tenant_id text NOT NULL DEFAULT 'default' REFERENCES tenants (id);
ALTER TABLE content_items ALTER COLUMN tenant_id DROP DEFAULT;
ALTER TABLE content_items ADD COLUMN IF NOT EXISTS created_by_agent_id uuid NOT NULL
    DEFAULT '00000000-0000-0000-0000-000000000001' REFERENCES agents (id);
ALTER TABLE content_items ALTER COLUMN created_by_agent_id DROP DEFAULT;

ALTER TABLE distribution_targets ADD COLUMN IF NOT EXISTS tenant_id text NOT NULL DEFAULT 'default'
    REFERENCES tenants (id);
ALTER TABLE distribution_targets ALTER COLUMN tenant_id DROP DEFAULT;
-- A short fingerprint of the target's secrets, so that they can be told apart without being shown.
ALTER TABLE distribution_targets ADD COLUMN IF NOT EXISTS secret_fingerprint text;
-- Target names are unique within a tenant: a name taken in another tenant says nothing.
ALTER TABLE distribution_targets DROP CONSTRAINT IF EXISTS distribution_targets_name_key;
CREATE UNIQUE INDEX IF NOT EXISTS distribution_targets_tenant_name ON distribution_targets (tenant_id, name);

ALTER TABLE distribution_plans ADD COLUMN IF NOT EXISTS tenant_id text NOT NULL DEFAULT 'default'
    REFERENCES tenants (id);
ALTER TABLE distribution_plans ALTER COLUMN tenant_id DROP DEFAULT;
-- Agent ids were free text (WORDCLAW_AGENT_ID, 'local-agent'); they are agents' ids now. The
-- plans made before belong to the local agent, and keep the name they were made under.
UPDATE distribution_plans SET options = options || jsonb_build_object('legacyAgentId', created_by_agent_id);
ALTER TABLE distribution_plans ALTER COLUMN created_by_agent_id TYPE uuid
    USING '00000000-0000-0000-0000-000000000001'::uuid;
ALTER TABLE distribution_plans DROP CONSTRAINT IF EXISTS distribution_plans_created_by_agent_id_fkey;
ALTER TABLE distribution_plans ADD CONSTRAINT distribution_plans_created_by_agent_id_fkey
    FOREIGN KEY (created_by_agent_id) REFERENCES agents (id);
-- A digest of the arguments an idempotency key was first used with.
ALTER TABLE distribution_plans ADD COLUMN IF NOT EXISTS request_digest text;

-- The duplicate rule's look-up: a tenant's recent plans for one item.
CREATE INDEX IF NOT EXISTS distribution_plans_recent ON distribution_plans (content_item_id, created_at);

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

-- The grant a job was allowed by; the worker checks it again before sending. Null: the plan's
-- agent created the item.
ALTER TABLE distribution_jobs ADD COLUMN IF NOT EXISTS entitlement_id uuid REFERENCES entitlements (id);

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

-- The time the duplicate, idempotency and expiry rules read: the transaction's time, moved by
-- the session setting wordclaw.clock_offset (seconds), which only tests set.
CREATE OR REPLACE FUNCTION wordclaw_now() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT now() + make_interval(secs => coalesce(nullif(current_setting('wordclaw.clock_offset', true), ''), '0')::float8)
$$;
