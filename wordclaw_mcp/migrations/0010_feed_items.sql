-- 0010: the entries of feed targets (rss, atom).

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
