-- Billing and the instance lifecycle: daily usage, charges, subscription packages, statements
-- and payments, pending quota changes, owners' contact addresses and sent notices.
-- Money is integer US cents. Days are UTC calendar days written 'YYYY-MM-DD', months
-- 'YYYY-MM'; both sort as text.

-- Traffic per account and UTC day, added by the traffic recorder in the same transaction as
-- `usage`. The owner, area and trial flag are copied from the instance, so that the rows stay
-- billable after the instance is released or deleted.
CREATE TABLE usage_days (
    instance_id TEXT NOT NULL,
    username TEXT NOT NULL,
    day TEXT NOT NULL,
    owner TEXT NOT NULL,
    area TEXT NOT NULL,
    trial INTEGER NOT NULL,
    rx_bytes BIGINT NOT NULL,
    tx_bytes BIGINT NOT NULL,
    PRIMARY KEY (instance_id, username, day)
);

CREATE INDEX usage_days_by_day ON usage_days (day, owner);

-- Every amount billed to an owner: subscriptions, renewals and upgrades when they are ordered,
-- packages when they are bought, and pay-as-you-go data once a day. `month` and `day` are
-- those the charge is billed in: the day of the traffic for pay-as-you-go, the order's day
-- for the rest.
CREATE TABLE charges (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    instance_id TEXT,
    area TEXT,
    kind TEXT NOT NULL,
    description TEXT NOT NULL,
    quantity BIGINT NOT NULL,
    unit TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    month TEXT NOT NULL,
    day TEXT NOT NULL,
    charged_at BIGINT NOT NULL
);

CREATE INDEX charges_by_month ON charges (month, owner);
-- One pay-as-you-go charge per instance and day, whatever runs the settlement.
CREATE UNIQUE INDEX charges_payg_day ON charges (instance_id, day) WHERE kind = 'payg';

-- Days whose pay-as-you-go data has been charged.
CREATE TABLE settled_days (
    day TEXT PRIMARY KEY,
    settled_at BIGINT NOT NULL
);

CREATE TABLE packages (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    size_gb BIGINT NOT NULL,
    price_cents BIGINT NOT NULL,
    -- The calendar month the package is valid in, and the day it counts from.
    month TEXT NOT NULL,
    day TEXT NOT NULL,
    bought_at BIGINT NOT NULL
);

CREATE INDEX packages_by_owner ON packages (owner, month);

-- One statement per owner and month with charges, issued once the month's last day is
-- settled. Unpaid after `due_date`, it locks the owner's instances.
CREATE TABLE statements (
    owner TEXT NOT NULL,
    month TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    issued_at BIGINT NOT NULL,
    due_date TEXT NOT NULL,
    PRIMARY KEY (owner, month)
);

CREATE TABLE payments (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    month TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    paid_at BIGINT NOT NULL,
    reference TEXT,
    FOREIGN KEY (owner, month) REFERENCES statements (owner, month)
);

-- A quota ordered with a renewal, which takes effect when the renewed period starts.
CREATE TABLE quota_changes (
    instance_id TEXT PRIMARY KEY REFERENCES instances (id) ON DELETE CASCADE,
    account_quota INTEGER NOT NULL,
    effective_at BIGINT NOT NULL,
    ordered_at BIGINT NOT NULL
);

-- Where an owner's notices go.
CREATE TABLE owner_contacts (
    owner TEXT PRIMARY KEY,
    email TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Lifecycle notices. A row is claimed ('sending') and committed before the email goes out,
-- then marked 'sent' or 'failed'; the key makes each notice one row, however often the
-- lifecycle runs. `subject` is the instance ID, or 'MONTH OWNER' for a statement.
CREATE TABLE notices (
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    due_at BIGINT NOT NULL,
    owner TEXT NOT NULL,
    recipient TEXT,
    email_subject TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    last_attempt_at BIGINT NOT NULL,
    sent_at BIGINT,
    error TEXT,
    PRIMARY KEY (kind, subject, due_at)
);
