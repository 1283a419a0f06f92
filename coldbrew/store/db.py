"""SQLite state: deployed functions, their versions, and one row per invocation.

Invocation rows are buffered in memory and written in batches (`flush`) by the control
plane's background task, so that an invocation never waits for a disk write. Reads
flush first, so they return every row.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coldbrew.spec import FunctionSpec, parse_spec

SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    spec TEXT NOT NULL,
    code_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS invocations (
    id TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    version INTEGER NOT NULL,
    instance_id TEXT,
    cold_start INTEGER NOT NULL,
    init_ms REAL,
    duration_ms REAL,
    status INTEGER NOT NULL,
    error_type TEXT,
    peak_memory_mb REAL,
    started_at REAL NOT NULL,
    output TEXT
);
CREATE INDEX IF NOT EXISTS invocations_by_function ON invocations (function, started_at);
"""


def _spec_json(spec: FunctionSpec) -> str:
    return json.dumps(spec.to_json(), sort_keys=True)


@dataclass(frozen=True)
class StoredFunction:
    spec: FunctionSpec
    version: int
    code_hash: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class InvocationRecord:
    id: str
    function: str
    version: int
    instance_id: str | None
    cold_start: bool
    init_ms: float | None
    duration_ms: float | None
    status: int
    error_type: str | None
    peak_memory_mb: float | None
    started_at: float
    output: str


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: list[InvocationRecord] = []

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()

    def next_version(self, spec: FunctionSpec, code_hash: str) -> tuple[int, bool]:
        """Return the version a deploy would get, and whether it differs from the current one."""
        spec_json = _spec_json(spec)
        with self._lock:
            row = self._db.execute(
                "SELECT f.version, v.spec, v.code_hash FROM functions f JOIN versions v "
                "ON v.name = f.name AND v.version = f.version WHERE f.name = ?",
                (spec.name,)).fetchone()
            if row is not None and row["spec"] == spec_json and row["code_hash"] == code_hash:
                return int(row["version"]), False
            latest = self._db.execute("SELECT MAX(version) FROM versions WHERE name = ?",
                                      (spec.name,)).fetchone()[0]
        return (latest or 0) + 1, True

    def save_version(self, spec: FunctionSpec, code_hash: str, version: int) -> None:
        """Record a deployed version and make it the function's current one, atomically."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?)",
                                 (spec.name, version, _spec_json(spec), code_hash, now))
                self._db.execute(
                    "INSERT INTO functions VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE "
                    "SET version = excluded.version, updated_at = excluded.updated_at",
                    (spec.name, version, now, now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def code_in_use(self, code_hash: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM versions WHERE code_hash = ? LIMIT 1",
                                   (code_hash,)).fetchone()
        return row is not None

    def delete_function(self, name: str) -> bool:
        with self._lock:
            cursor = self._db.execute("DELETE FROM functions WHERE name = ?", (name,))
        return cursor.rowcount > 0

    def functions(self) -> list[StoredFunction]:
        with self._lock:
            rows = self._db.execute(
                "SELECT f.version, f.created_at, f.updated_at, v.spec, v.code_hash "
                "FROM functions f JOIN versions v ON v.name = f.name AND v.version = f.version "
                "ORDER BY f.name").fetchall()
        return [StoredFunction(parse_spec(json.loads(row["spec"])), row["version"],
                               row["code_hash"], row["created_at"], row["updated_at"])
                for row in rows]

    def record_invocation(self, record: InvocationRecord) -> None:
        # Only the short pending-list lock: the request path never waits for a write.
        with self._pending_lock:
            self._pending.append(record)

    def flush(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        rows = [(r.id, r.function, r.version, r.instance_id, int(r.cold_start), r.init_ms,
                 r.duration_ms, r.status, r.error_type, r.peak_memory_mb, r.started_at, r.output)
                for r in pending]
        with self._lock:
            # One transaction per batch: a commit per row costs about 5 times as much.
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO invocations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def invocations(self, function: str, limit: int) -> list[dict[str, Any]]:
        self.flush()
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM invocations WHERE function = ? ORDER BY started_at DESC LIMIT ?",
                (function, limit)).fetchall()
        return [{**dict(row), "cold_start": bool(row["cold_start"])} for row in rows]
