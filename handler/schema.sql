-- The local job store (handler/store.py): jobs, and the outbox of emitted events.
-- jobs.seq is the rowid, without AUTOINCREMENT: jobs are never deleted, so a new job gets the
-- largest seq plus one either way, and no commit writes a sqlite_sequence page. A store created
-- with AUTOINCREMENT keeps it; both number jobs alike.
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    job_uuid TEXT NOT NULL UNIQUE,
    digest TEXT NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    run_id TEXT,
    owner TEXT,
    scheduled_at TEXT NOT NULL,
    started_at TEXT,
    completed_at TEXT,
    progress TEXT,
    progress_emitted_at REAL,
    progress_emitted_step INTEGER,
    result TEXT,
    error TEXT,
    backend_state TEXT,
    submit_attempts INTEGER NOT NULL DEFAULT 0,
    next_submit_at REAL NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    reply TEXT,
    -- who requested it (handler/identity.py; NULL: identity checks off): the per-caller limit
    caller TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    job_uuid TEXT NOT NULL,
    type TEXT NOT NULL,
    event TEXT NOT NULL,
    created_at REAL NOT NULL,
    sink_done INTEGER NOT NULL DEFAULT 0,
    local_done INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    last_error TEXT
);
-- Undelivered events only: most rows are born delivered, so the delivery loop's lookups (due
-- rows in order; a job's earlier undelivered events) stay small however long the outbox grows,
-- and a row born delivered costs no index write.
DROP INDEX IF EXISTS outbox_pending;
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (seq) WHERE sink_done = 0 OR local_done = 0;
CREATE INDEX IF NOT EXISTS outbox_job_due ON outbox (job_uuid, seq)
    WHERE sink_done = 0 OR local_done = 0;
