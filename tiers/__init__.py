"""Storage tiers for fixed-size KV blocks: host shared-memory arena, disk, Redis, and a stack."""
