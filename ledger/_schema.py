"""The ledger file format: its schema, its version, and the migrations between versions.

``PRAGMA user_version`` holds the schema version; the ``meta`` table names the format and the
actor, so a foreign SQLite file or another actor's ledger is refused instead of written to.
"""

from __future__ import annotations

FORMAT = "durable-triggers-ledger"
SCHEMA_VERSION = 1

# Each entry upgrades from version (index) to version (index + 1).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;

    -- The truth: append-only facts. ids grow in commit order (writers are serialized).
    CREATE TABLE events (
        id              INTEGER PRIMARY KEY,
        ts              INTEGER NOT NULL,
        kind            TEXT    NOT NULL,
        payload         TEXT    NOT NULL,
        intent_event_id INTEGER
    );
    CREATE INDEX events_by_intent ON events (intent_event_id)
        WHERE intent_event_id IS NOT NULL;

    -- The cursor: one schedule row per intent, keyed by the intent event's id.
    CREATE TABLE intents (
        id                  INTEGER PRIMARY KEY,
        trigger_kind        TEXT    NOT NULL,
        status              TEXT    NOT NULL,
        due_at              INTEGER NOT NULL,
        created_at          INTEGER NOT NULL,
        attempts            INTEGER NOT NULL DEFAULT 0,
        redrives            INTEGER NOT NULL DEFAULT 0,
        redrive             INTEGER NOT NULL DEFAULT 0,
        claim_token         TEXT,
        claimed_by          TEXT,
        lease_until         INTEGER,
        cancel_requested_at INTEGER,
        cancel_reason       TEXT,
        cancel_requested_by TEXT,
        idempotency_key     TEXT,
        finished_at         INTEGER,
        terminal_event_ids  TEXT
    );
    CREATE INDEX intents_pending ON intents (due_at, id) WHERE status = 'pending';
    CREATE INDEX intents_running ON intents (lease_until) WHERE status = 'running';
    CREATE UNIQUE INDEX intents_by_key ON intents (idempotency_key)
        WHERE idempotency_key IS NOT NULL;

    CREATE TABLE projections (
        name          TEXT PRIMARY KEY,
        state         TEXT    NOT NULL,
        last_event_id INTEGER NOT NULL
    ) WITHOUT ROWID;

    -- Attached output streams: transport for live progress, not truth.
    CREATE TABLE stream_chunks (
        intent_event_id INTEGER NOT NULL,
        seq             INTEGER NOT NULL,
        data            TEXT    NOT NULL,
        PRIMARY KEY (intent_event_id, seq)
    ) WITHOUT ROWID;
    """,
)

assert len(MIGRATIONS) == SCHEMA_VERSION
