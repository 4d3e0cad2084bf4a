"""Opening the database (SQLite with the pragmas durability depends on, or PostgreSQL through
store.postgres when it is a URL), and its schema."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
from pathlib import Path

from mailrelay.store.backend import Connection, begin, is_url

# Each entry moves the schema one version forward; PRAGMA user_version records how far a file is
# (on PostgreSQL, the schema_version table). Never edit a released entry: append a new one.
# Written in SQLite's dialect; postgres.translate_ddl makes PostgreSQL's of it, so keep to what
# it translates (INTEGER, REAL, BLOB, INTEGER PRIMARY KEY, WITHOUT ROWID) and to SQL both know.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE messages (
        id TEXT PRIMARY KEY,
        sender TEXT NOT NULL,                 -- envelope MAIL FROM; '' for a bounce
        auth_user TEXT,                       -- who submitted it; NULL for bounces made here
        client_ip TEXT,
        sender_domain TEXT,                   -- whose notification address gets bounce copies
        size INTEGER NOT NULL,
        data BLOB,                            -- signed, as it will leave; NULL once all are final
        is_bounce INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE TABLE recipients (
        id INTEGER PRIMARY KEY,
        message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        address TEXT NOT NULL,
        domain TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('queued', 'active', 'deferred', 'sent', 'bounced')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        status TEXT,                          -- last RFC 3463 status, e.g. 4.4.1
        reply TEXT,                           -- last reply or diagnostic
        updated_at REAL NOT NULL
    );
    CREATE INDEX recipients_message ON recipients(message_id);
    CREATE INDEX recipients_due ON recipients(next_attempt_at)
        WHERE state IN ('queued', 'deferred');
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        message_id TEXT NOT NULL,
        recipient TEXT NOT NULL,
        mx_host TEXT,
        mx_address TEXT,
        reply TEXT,
        tls_protocol TEXT,
        tls_cipher TEXT,
        cert_fingerprint TEXT,
        cert_verified INTEGER,
        verdict TEXT NOT NULL                 -- sent | deferred | bounced | insecure
    );
    CREATE INDEX attempts_message ON attempts(message_id);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        message_id TEXT NOT NULL,
        recipient TEXT NOT NULL,
        domain TEXT NOT NULL,
        event TEXT NOT NULL
            CHECK (event IN ('QUEUED', 'REFUSED', 'DELIVERED', 'SOFT-BOUNCE', 'HARD-BOUNCE')),
        mx TEXT,
        reply TEXT,
        tls_protocol TEXT,
        tls_cipher TEXT
    );
    CREATE INDEX events_message ON events(message_id);
    CREATE TABLE users (
        address TEXT PRIMARY KEY,
        domain TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE domains (
        name TEXT PRIMARY KEY,
        notify TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('unverified', 'valid')),
        created_at REAL NOT NULL,
        checked_at REAL
    );
    CREATE TABLE dkim_keys (
        id INTEGER PRIMARY KEY,
        domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
        selector TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        private_key_path TEXT NOT NULL,
        public_record TEXT NOT NULL,
        active INTEGER NOT NULL,              -- signs new mail; inactive keys stay listed
        created_at REAL NOT NULL,
        UNIQUE (domain, selector)
    );
    """,
    # `mailrelay log --domain D` and `--since T` page newest first; without these indexes a
    # quiet domain or an old --since scans the whole event history.
    """
    CREATE INDEX events_domain ON events(domain, id);
    CREATE INDEX events_at ON events(at);
    """,
    # Wave 2 delivery: one result vocabulary (sent | transient | permanent | insecure) in the
    # evidence, the policy that authenticated or refused each connection, the claim time that
    # tells an interrupted attempt from a finished one, and the MTA-STS policy cache (RFC 8461
    # §5.1: a cached policy must survive a restart, or a downgrade attacker only has to wait).
    """
    UPDATE attempts SET verdict = 'transient' WHERE verdict = 'deferred';
    UPDATE attempts SET verdict = 'permanent' WHERE verdict = 'bounced';
    ALTER TABLE attempts ADD COLUMN policy TEXT;
    ALTER TABLE attempts ADD COLUMN policy_detail TEXT;
    ALTER TABLE recipients ADD COLUMN claimed_at REAL;
    ALTER TABLE events ADD COLUMN policy TEXT;
    ALTER TABLE events ADD COLUMN policy_detail TEXT;
    -- A million queued recipients must not slow the claim, the metrics scrape or a page of
    -- `queue list`: states are counted from an index, pages walk messages in order.
    CREATE INDEX recipients_state ON recipients(state);
    CREATE INDEX messages_created ON messages(created_at, id);
    CREATE TABLE sts_policies (
        domain TEXT PRIMARY KEY,
        policy_id TEXT NOT NULL,              -- the id of the _mta-sts TXT record it came with
        mode TEXT NOT NULL CHECK (mode IN ('enforce', 'testing', 'none')),
        mx_patterns TEXT NOT NULL,            -- one pattern per line, as in the policy
        max_age INTEGER NOT NULL,             -- seconds, already capped at 31557600
        fetched_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        body TEXT NOT NULL                    -- the policy file as fetched, for the record
    );
    """,
    # Who may send as whom (Postfix's smtpd_sender_login_maps): a user may always send as their
    # own address; each row lets them send as one more address, or as any address of one of our
    # domains ('@example.org'). And per-user rates and quotas ([limits]): what each user has had
    # queued in the current minute, hour and day, counted in the transaction that queues the
    # message, so that a restart resets nothing and a refused message counts for nothing.
    """
    CREATE TABLE sender_grants (
        user_address TEXT NOT NULL REFERENCES users(address) ON DELETE CASCADE,
        sender TEXT NOT NULL,                 -- 'bob@example.org', or '@example.org'
        created_at REAL NOT NULL,
        PRIMARY KEY (user_address, sender)
    );
    CREATE TABLE user_usage (
        user_address TEXT NOT NULL,
        period TEXT NOT NULL CHECK (period IN ('minute', 'hour', 'day')),
        started_at REAL NOT NULL,             -- the current window: a whole minute, hour, UTC day
        messages INTEGER NOT NULL,
        recipients INTEGER NOT NULL,
        PRIMARY KEY (user_address, period)
    );
    """,
    # Two-step DKIM rotation: `rotate-dkim` adds the next key unsigned (activated_at NULL) until
    # `activate-dkim` finds its record published. Every key made before this signed from its start.
    """
    ALTER TABLE dkim_keys ADD COLUMN activated_at REAL;
    UPDATE dkim_keys SET activated_at = created_at;
    """,
    # 6: RFC 8689 travels with the message, across restarts: the sender's REQUIRETLS, and a
    # "TLS-Required: No" header (tls_optional), which delivery honours only where configured.
    """
    ALTER TABLE messages ADD COLUMN requiretls INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN tls_optional INTEGER NOT NULL DEFAULT 0;
    """,
    # 7: TLS reporting (RFC 8460). Delivery adds each session to a per-day aggregate (one row
    # per policy, one per distinct failure: never a row per session); the daily report freezes
    # a domain's day into the JSON sent and drops its aggregates. Each rua URI of a report is a
    # delivery of its own. A report that goes by mail is a message of ours, marked so that its
    # own sessions are never counted (RFC 8460 §3: a report about the report's delivery).
    """
    ALTER TABLE messages ADD COLUMN tlsrpt_report INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE tlsrpt_policies (
        id INTEGER PRIMARY KEY,
        domain TEXT NOT NULL,                 -- the policy domain, lowercase A-labels
        day TEXT NOT NULL,                    -- UTC, YYYY-MM-DD
        policy_type TEXT NOT NULL CHECK (policy_type IN ('tlsa', 'sts', 'no-policy-found')),
        policy_strings TEXT NOT NULL,         -- JSON array: the TLSA records or policy lines
        mx_hosts TEXT NOT NULL,               -- JSON array: the MTA-STS mx patterns
        successful INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        UNIQUE (domain, day, policy_type, policy_strings, mx_hosts)
    );
    CREATE TABLE tlsrpt_failures (
        policy_id INTEGER NOT NULL REFERENCES tlsrpt_policies(id) ON DELETE CASCADE,
        result_type TEXT NOT NULL,
        sending_ip TEXT NOT NULL,             -- '' where unknown (NULLs would never conflict)
        receiving_mx TEXT NOT NULL,
        receiving_ip TEXT NOT NULL,
        sessions INTEGER NOT NULL,
        reason TEXT,                          -- the latest failure-reason-code seen
        PRIMARY KEY (policy_id, result_type, sending_ip, receiving_mx, receiving_ip)
    ) WITHOUT ROWID;
    CREATE TABLE tlsrpt_reports (
        id TEXT PRIMARY KEY,                  -- the report-id is id@hostname
        report_id TEXT NOT NULL,
        domain TEXT NOT NULL,
        day TEXT NOT NULL,
        created_at REAL NOT NULL,
        report_json TEXT NOT NULL,            -- exactly as sent
        UNIQUE (domain, day)
    );
    CREATE TABLE tlsrpt_deliveries (
        report_key TEXT NOT NULL REFERENCES tlsrpt_reports(id) ON DELETE CASCADE,
        uri TEXT NOT NULL,
        method TEXT NOT NULL CHECK (method IN ('mailto', 'https')),
        state TEXT NOT NULL CHECK (state IN ('pending', 'queued', 'sent', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        first_attempt_at REAL,
        next_attempt_at REAL NOT NULL,        -- pending: when it is due (a claim moves it on)
        message_id TEXT,                      -- mailto: the queued report message
        detail TEXT,                          -- why it failed, or the last error
        updated_at REAL NOT NULL,
        PRIMARY KEY (report_key, uri)
    );
    CREATE INDEX tlsrpt_deliveries_state ON tlsrpt_deliveries(state, next_attempt_at);
    """,
    # 8: HTTP API keys (issue 15): only the SHA-256 of each random token is kept. An answer to a
    # request with an Idempotency-Key is kept with the request's hash, per key, committed with
    # the message it queued, so that a retry gets the same answer and queues nothing twice.
    """
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        domain TEXT NOT NULL,
        scope TEXT NOT NULL CHECK (scope IN ('send', 'read', 'manage')),
        token_sha256 TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE TABLE api_idempotency (
        key_id TEXT NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
        idempotency_key TEXT NOT NULL,
        request_sha256 TEXT NOT NULL,
        status INTEGER NOT NULL,
        response TEXT NOT NULL,               -- the JSON answered
        created_at REAL NOT NULL,
        PRIMARY KEY (key_id, idempotency_key)
    ) WITHOUT ROWID;
    """,
    # 9: the suppression list (store/suppressions.py): a recipient address one of our sending
    # domains no longer mails, after a hard bounce or by hand, until expires_at (NULL: never).
    # Keyed by (sending domain, address) so that the RCPT check is one primary-key lookup.
    """
    CREATE TABLE suppressions (
        domain TEXT NOT NULL,                 -- the sending domain, lowercase
        address TEXT NOT NULL,                -- the recipient, lowercase
        reason TEXT NOT NULL,                 -- one printable line, e.g. '550 5.1.1 user unknown'
        source TEXT NOT NULL CHECK (source IN ('bounce', 'manual')),
        message_id TEXT,                      -- the message whose bounce added it
        created_at REAL NOT NULL,
        expires_at REAL,
        PRIMARY KEY (domain, address)
    ) WITHOUT ROWID;
    CREATE INDEX suppressions_expires ON suppressions(expires_at);
    """,
    # 10: webhooks (store/webhooks.py): HTTPS endpoints of our sending domains, and the outbox
    # of their deliveries, written in the commit that records the outcome they report.
    """
    CREATE TABLE webhook_endpoints (
        id TEXT PRIMARY KEY,                  -- 'ep_' and 16 hex digits
        domain TEXT NOT NULL,                 -- the sending domain, lowercase
        url TEXT NOT NULL,                    -- https:// only
        events TEXT NOT NULL,                 -- comma-separated: delivered,deferred,...
        secret TEXT NOT NULL,                 -- 'whsec_' and base64 (Standard Webhooks)
        created_at REAL NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX webhook_endpoints_domain ON webhook_endpoints(domain);
    CREATE TABLE webhook_deliveries (
        id TEXT PRIMARY KEY,                  -- 'msg_…': the webhook-id, the same on retries
        endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints(id) ON DELETE CASCADE,
        event TEXT NOT NULL
            CHECK (event IN ('delivered', 'deferred', 'bounced', 'insecure', 'suppressed')),
        payload TEXT NOT NULL,                -- the JSON body, exactly as posted
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,        -- pending: when it is due (a claim moves it on)
        state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries(state, next_attempt_at);
    CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries(endpoint_id);
    CREATE INDEX webhook_deliveries_created ON webhook_deliveries(created_at);
    """,
    # 11: an API key may hold several domains (`apikey add --domain a.org --domain b.org`): one
    # row per key and domain, the single domain of each key made before moved in. A domain
    # need not exist yet: a key made with --new-domain may add it over the API.
    """
    CREATE TABLE api_key_domains (
        key_id TEXT NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
        domain TEXT NOT NULL,                 -- lowercase
        PRIMARY KEY (key_id, domain)
    ) WITHOUT ROWID;
    CREATE INDEX api_key_domains_domain ON api_key_domains(domain);
    INSERT INTO api_key_domains (key_id, domain) SELECT id, domain FROM api_keys;
    ALTER TABLE api_keys DROP COLUMN domain;
    """,
    # 12: DKIM private keys in the shared store (PostgreSQL): the PEM sealed with AES-256-GCM under
    # dkim.master_key_file (dkim.seal). NULL where the key is a file in dkim.key_dir (SQLite).
    """
    ALTER TABLE dkim_keys ADD COLUMN private_key_enc BLOB;
    """,
    # 13: several instances on one database (store/claims.py): who holds an active recipient's
    # claim ([instance] id) and until when; another instance takes it back once the lease ran
    # out. NULL on claims made before (one instance): the next start releases those.
    """
    ALTER TABLE recipients ADD COLUMN claimed_by TEXT;
    ALTER TABLE recipients ADD COLUMN lease_until REAL;
    CREATE INDEX recipients_leases ON recipients(lease_until) WHERE state = 'active';
    """,
    # 14: the delivery log in commit order with several writers (store/events.py). On SQLite one
    # writer at a time hands out ids in commit order and txid stays 0; PostgreSQL stamps each
    # event with its transaction's id (postgres.PG_ONLY), so that a page only shows events
    # whose transactions, and every earlier one, have ended.
    """
    ALTER TABLE events ADD COLUMN txid INTEGER NOT NULL DEFAULT 0;
    """,
)


_FULL = 2  # PRAGMA synchronous = FULL: fsync the WAL at every commit


def connect(path: str, *, busy_timeout: float = 30.0) -> Connection:
    """Open (creating if needed) the database, migrated to the latest schema: the SQLite file at
    `path`, or the PostgreSQL database if `path` is a postgresql:// URL (storage.database).

    WAL lets readers run beside the single writer; synchronous=FULL makes every COMMIT fsync the
    WAL, which is what a 250 reply to DATA promises.
    """
    if is_url(path):
        from mailrelay.store import postgres

        return postgres.connect(path)
    return connect_sqlite(path, busy_timeout=busy_timeout)


def connect_sqlite(path: str, *, busy_timeout: float = 30.0) -> sqlite3.Connection:
    """`connect` for a SQLite file (or ":memory:")."""
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
    )
    conn.row_factory = sqlite3.Row
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    conn.execute("PRAGMA synchronous = FULL")
    # Read back, not assumed: a file system without shared memory for the WAL index (some
    # network mounts) silently keeps another journal mode, and then a 250 would not mean what
    # it says. ":memory:" databases have no journal to speak of.
    synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    if path != ":memory:" and (str(mode).lower() != "wal" or synchronous != _FULL):
        conn.close()
        raise sqlite3.OperationalError(
            f"{path}: cannot guarantee durable commits (journal_mode={mode},"
            f" synchronous={synchronous}); put the database on a local file system"
        )
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    _migrate(conn)
    if path != ":memory:":
        # The queue holds message bodies: personal data, readable by the service only.
        owner = os.stat(path)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.chmod(path + suffix, 0o600)
                if suffix and os.geteuid() == 0:
                    # Root (the CLI) on the service user's database: the -wal and -shm it makes
                    # must be the service's too. SQLite's own unix VFS does this as well; here
                    # it does not depend on how SQLite was built.
                    os.chown(path + suffix, owner.st_uid, owner.st_gid)
    return conn


def open_readonly(path: str) -> Connection:
    """Open an existing database for queries only (listings, reports).

    Raises FileNotFoundError, creating nothing, when there is no database at `path`: a listing
    must not leave an empty database (or its directory) behind for a mistyped config.
    """
    if is_url(path):
        from mailrelay.store import postgres

        return postgres.open_readonly(path)
    # stat() raises FileNotFoundError for a missing file, and another OSError (say, a parent
    # that is not a directory) for a path that could never hold one.
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise IsADirectoryError(errno.EISDIR, "not a regular file", path)
    return connect(path)


def _migrate(conn: sqlite3.Connection) -> None:
    begin(conn)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def statements(script: str) -> list[str]:
    # executescript() would COMMIT our transaction; split instead (no ';' inside our DDL strings).
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


_statements = statements  # the name tests of old migrations use
