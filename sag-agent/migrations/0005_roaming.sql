-- Roaming: an account replicated to an instance in another area. A replica names the
-- instance of its source account (same username); NULL for an account that is no replica.
ALTER TABLE accounts ADD COLUMN replica_of TEXT;

CREATE INDEX accounts_replica_of ON accounts (replica_of, username);
