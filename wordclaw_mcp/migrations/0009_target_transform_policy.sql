-- 0009: a target may hold a default transform policy; a plan's policy wins over it field by field.

ALTER TABLE distribution_targets ADD COLUMN IF NOT EXISTS transform_policy jsonb;
