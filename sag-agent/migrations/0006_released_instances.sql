-- Instances released by the lifecycle, so that a login to one gets "released" rather than
-- "not found". Only the ID, owner and time are kept.
CREATE TABLE released_instances (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    released_at BIGINT NOT NULL
);
