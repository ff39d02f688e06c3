-- 0015: a target records whether the server that registered it allowed private addresses.

-- Workers deliver under the policy the target was registered with, so a loopback webhook
-- registered where WORDCLAW_ALLOW_PRIVATE_TARGETS=1 is delivered by a worker without it.
-- Targets from before this column were registered under a policy nobody recorded: false, so
-- they keep working where they did, by workers that have the setting themselves.
ALTER TABLE distribution_targets ADD COLUMN IF NOT EXISTS private_addresses_allowed boolean NOT NULL DEFAULT false;
