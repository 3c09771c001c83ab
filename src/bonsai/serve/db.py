"""Job history in SQLite (stdlib sqlite3): one row per job, images as PNG files beside it.

A job row is written when the job is queued and updated when it starts and ends, so a restart
finds every finished job and marks the ones that were queued or running as interrupted."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '[]',
    images INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    warnings TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
"""

ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled", "interrupted")


@dataclass(frozen=True)
class JobRecord:
    id: str
    source: str
    status: str
    spec: dict[str, Any]
    params: list[str]  # per image: its A1111 "parameters" text
    images: int
    error: str | None
    warnings: list[str]  # what the generation warned of (pipeline.GenerationWarning), for a job that ran
    created: float
    started: float | None
    finished: float | None


class JobDB:
    """Thread-safe access to the history database (one connection, one lock)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
        if "warnings" not in columns:  # a history written before jobs kept their warnings
            self._conn.execute("ALTER TABLE jobs ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]'")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _exec(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def mark_interrupted(self) -> int:
        """After a restart: jobs left queued or running will never finish; say so. Returns how many."""
        with self._lock:
            cur = self._conn.execute(
                "UPDATE jobs SET status='interrupted', error='the server stopped before this job finished', finished=? "
                "WHERE status IN (?, ?)",
                (time.time(), *ACTIVE),
            )
            return cur.rowcount

    def insert(self, job_id: str, source: str, spec: dict[str, Any], created: float) -> None:
        self._exec(
            "INSERT INTO jobs (id, source, status, spec, created) VALUES (?, ?, 'queued', ?, ?)",
            (job_id, source, json.dumps(spec), created),
        )

    def started(self, job_id: str, when: float) -> None:
        self._exec("UPDATE jobs SET status='running', started=? WHERE id=?", (when, job_id))

    def finished(self, job_id: str, status: str, when: float, params: list[str] = (), error: str | None = None,
                 warnings: list[str] = ()) -> None:
        assert status in FINAL
        self._exec(
            "UPDATE jobs SET status=?, finished=?, params=?, images=?, error=?, warnings=? WHERE id=?",
            (status, when, json.dumps(list(params)), len(params), error, json.dumps(list(warnings)), job_id),
        )

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._exec(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,))
        return _record(rows[0]) if rows else None

    def history(self, limit: int = 50, before: int | None = None, status: str | None = None) -> tuple[list[JobRecord], int | None]:
        """Newest first; returns (records, cursor for the next page or None)."""
        where, args = [], []
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._exec(f"SELECT {_COLUMNS}, seq FROM jobs {clause} ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        return [_record(r) for r in rows], (rows[-1][-1] if more else None)

    def count(self, status: str) -> int:
        return self._exec("SELECT COUNT(*) FROM jobs WHERE status=?", (status,))[0][0]


_COLUMNS = "id, source, status, spec, params, images, error, warnings, created, started, finished"


def _record(row: tuple) -> JobRecord:
    id_, source, status, spec, params, images, error, warnings, created, started, finished = row[:11]
    return JobRecord(id_, source, status, json.loads(spec), json.loads(params), images, error, json.loads(warnings),
                     created, started, finished)
