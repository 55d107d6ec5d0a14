-- WireGuard tunnels of instances, and the sessions of logged-in clients on them.

CREATE TABLE tunnels (
    instance_id TEXT PRIMARY KEY REFERENCES instances (id) ON DELETE CASCADE,
    -- The gateway's X25519 private key, base64. The store file is root-only (mode 0600).
    private_key TEXT NOT NULL,
    listen_port INTEGER NOT NULL UNIQUE
);

-- One session per account: a new login replaces the previous one.
CREATE TABLE sessions (
    instance_id TEXT NOT NULL,
    username TEXT NOT NULL,
    public_key TEXT NOT NULL UNIQUE,
    address TEXT NOT NULL,
    -- SHA-256 of the logout token, hex; the token itself is only with the client.
    token_hash TEXT NOT NULL,
    -- 1 for an exported configuration, which stays until replaced or logged out; 0 for a
    -- login session, which ends when the peer has had no handshake for the idle time.
    persistent INTEGER NOT NULL,
    started_at BIGINT NOT NULL,
    PRIMARY KEY (instance_id, username),
    FOREIGN KEY (instance_id, username) REFERENCES accounts (instance_id, username)
        ON DELETE CASCADE
);
