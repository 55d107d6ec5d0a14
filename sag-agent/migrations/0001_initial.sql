-- Instances, their network configuration and client accounts.
-- Portable SQL: the same statements run on SQLite and PostgreSQL. Times are Unix seconds,
-- flags are 0 or 1, addresses and CIDR blocks are text.

CREATE TABLE ccns (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE cens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    kernel_number INTEGER NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    area TEXT NOT NULL,
    account_quota INTEGER NOT NULL,
    trial INTEGER NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    auto_renew INTEGER NOT NULL,
    state TEXT NOT NULL,
    ccn_id TEXT REFERENCES ccns (id),
    cen_id TEXT REFERENCES cens (id),
    dns_active TEXT,
    dns_standby TEXT,
    client_to_client INTEGER NOT NULL
);

CREATE TABLE trials (
    owner TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    claimed_at BIGINT NOT NULL
);

CREATE TABLE cidr_blocks (
    instance_id TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    block TEXT NOT NULL,
    PRIMARY KEY (instance_id, block)
);

CREATE TABLE allowed_destinations (
    instance_id TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    block TEXT NOT NULL,
    PRIMARY KEY (instance_id, block)
);

CREATE TABLE accounts (
    instance_id TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    username TEXT NOT NULL,
    email TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    static_ip TEXT,
    bandwidth_kbps INTEGER NOT NULL,
    enabled INTEGER NOT NULL,
    last_ip TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (instance_id, username)
);

-- Two accounts of one instance never share a static address (NULLs do not collide).
CREATE UNIQUE INDEX accounts_static_ip ON accounts (instance_id, static_ip);

CREATE TABLE usage (
    instance_id TEXT NOT NULL,
    username TEXT NOT NULL,
    month TEXT NOT NULL,
    rx_bytes BIGINT NOT NULL,
    tx_bytes BIGINT NOT NULL,
    PRIMARY KEY (instance_id, username, month)
);
