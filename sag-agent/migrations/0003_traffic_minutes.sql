-- Traffic per account and minute, for `sag-agent monitor` and monthly usage. The agent adds
-- one row per account that moved traffic in a minute; a minute without a row had none.
-- `username` is empty for traffic of the instance that belongs to no account (spoofed
-- packets on its tunnel).

CREATE TABLE traffic_minutes (
    instance_id TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    username TEXT NOT NULL,
    -- Start of the minute, Unix seconds.
    minute BIGINT NOT NULL,
    rx_bytes BIGINT NOT NULL,
    tx_bytes BIGINT NOT NULL,
    rx_packets BIGINT NOT NULL,
    tx_packets BIGINT NOT NULL,
    rx_dropped_packets BIGINT NOT NULL,
    tx_dropped_packets BIGINT NOT NULL,
    PRIMARY KEY (instance_id, username, minute)
);

CREATE INDEX traffic_minutes_by_minute ON traffic_minutes (minute);
