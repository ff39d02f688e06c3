-- 0014: the file a feed target writes, kept in its config (config_json.file, relative to
-- WORDCLAW_FEEDS_DIR) and unique across tenants, active or not, so that two feeds never write one
-- file. Targets registered from now on write in their tenant's folder (<tenant>/<path>). Those
-- made before keep writing where they did (their path, as a path: 'news//feed.xml' is
-- 'news/feed.xml'), so their subscribers' URLs do not break; but where two already shared a file,
-- the oldest keeps it and each newer one moves to its tenant's folder, or, if that is taken too,
-- to a folder of its own there (<tenant>/<target id>/<path>).
WITH feeds AS (
    SELECT id, tenant_id, created_at,
           array_to_string(
               array(SELECT part
                     FROM unnest(string_to_array(config_json->>'path', '/')) WITH ORDINALITY AS p (part, n)
                     WHERE part NOT IN ('', '.')
                     ORDER BY n),
               '/') AS path
    FROM distribution_targets
    WHERE channel_type IN ('rss', 'atom') AND config_json ? 'path' AND NOT config_json ? 'file'
),
ranked AS (
    SELECT *, row_number() OVER (PARTITION BY lower(path) ORDER BY created_at, id) AS nth FROM feeds
),
kept AS (
    SELECT id, path AS file FROM ranked WHERE nth = 1
),
moving AS (
    SELECT id, tenant_id, path, created_at, tenant_id || '/' || path AS candidate FROM ranked WHERE nth > 1
),
moved AS (
    SELECT id,
           CASE WHEN row_number() OVER (PARTITION BY lower(candidate) ORDER BY created_at, id) = 1
                     AND NOT EXISTS (SELECT 1 FROM kept WHERE lower(kept.file) = lower(moving.candidate))
                THEN candidate
                ELSE tenant_id || '/' || id::text || '/' || path
           END AS file
    FROM moving
)
UPDATE distribution_targets t
SET config_json = t.config_json || jsonb_build_object('file', f.file)
FROM (SELECT id, file FROM kept UNION ALL SELECT id, file FROM moved) f
WHERE t.id = f.id;

-- Compared without case: on a case-insensitive file system News.xml and news.xml are one file.
CREATE UNIQUE INDEX IF NOT EXISTS distribution_targets_feed_file
    ON distribution_targets (lower(config_json->>'file')) WHERE channel_type IN ('rss', 'atom');
