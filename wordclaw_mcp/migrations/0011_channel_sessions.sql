-- 0011: channels' login sessions per target (Bluesky), encrypted.

-- A channel's login session for a target (a Bluesky session's tokens), encrypted like the
-- target's secrets, so a worker reuses it instead of logging in for every post.
CREATE TABLE IF NOT EXISTS channel_sessions (
    target_id   uuid PRIMARY KEY REFERENCES distribution_targets (id) ON DELETE CASCADE,
    ciphertext  bytea NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
