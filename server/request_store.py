"""Request records in SQLite: every edit's status, result and error, and an async job's inputs until it ends.

One embedded database in the data dir (`LOUPE_DATABASE_URL`), in WAL mode so readers never wait for the
writer; one connection shared under a lock, so concurrent writers queue here instead of failing with
`database is locked`. The schema carries its version (`PRAGMA user_version`) and is brought up to date
by the migrations below, in order, at start-up.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from server.config import Settings, SettingsError

Status = Literal["pending", "processing", "completed", "failed", "cancelled"]
FINAL: tuple[Status, ...] = ("completed", "failed", "cancelled")

# Each entry takes the schema from its index to the next version; never edit one that has shipped.
MIGRATIONS = (
    """
    CREATE TABLE requests (
        id TEXT PRIMARY KEY,
        owner TEXT,
        status TEXT NOT NULL,
        created REAL NOT NULL,
        started_at REAL,
        completed_at REAL,
        model TEXT NOT NULL,
        executed_model TEXT,
        provider TEXT,
        cost REAL,
        background INTEGER NOT NULL,
        webhook_url TEXT,
        job TEXT,
        result TEXT,
        error TEXT,
        webhook_attempts TEXT NOT NULL DEFAULT '[]'
    );
    CREATE INDEX requests_by_time ON requests (created DESC, id DESC);
    CREATE INDEX requests_by_end ON requests (completed_at) WHERE completed_at IS NOT NULL;
    """,
)


@dataclass
class RequestRow:
    id: str
    owner: str | None
    status: Status
    created: float
    model: str
    background: bool  # submitted async: answered 202, run in the background
    started_at: float | None = None
    completed_at: float | None = None
    executed_model: str | None = None
    provider: str | None = None
    cost: float | None = None
    webhook_url: str | None = None
    job: dict[str, Any] | None = None  # what re-runs an async job after a restart; dropped when it ends
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    webhook_attempts: list[dict[str, Any]] = field(default_factory=list)


_JSON_COLUMNS = ("job", "result", "error", "webhook_attempts")
_COLUMNS = tuple(RequestRow.__dataclass_fields__)


def database_path(settings: Settings) -> Path:
    """The SQLite file `LOUPE_DATABASE_URL` names (default `<data dir>/loupe.db`).

    As SQLAlchemy spells it: `sqlite:///relative/loupe.db`, `sqlite:////absolute/loupe.db`.
    """
    url = settings.database_url
    if url is None:
        return settings.data_dir / "loupe.db"
    parsed = urlparse(url)
    if parsed.scheme != "sqlite" or parsed.netloc or not parsed.path.strip("/"):
        raise SettingsError(f"LOUPE_DATABASE_URL must look like sqlite:///path/to/loupe.db, not {url!r}")
    return Path(parsed.path[1:])


class RequestStore:
    def __init__(self, path: Path) -> None:
        """Open (or create) the database and migrate it; SettingsError naming the file when it can't be used."""
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 10000")
            if self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise sqlite3.OperationalError("it can't be put in WAL mode")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
            self._db.execute("BEGIN IMMEDIATE")  # proves the file is writable now, not at the first request
            self._db.execute("ROLLBACK")
        except (sqlite3.Error, OSError) as error:
            raise SettingsError(f"the request database {path} can't be used: {error}. Fix or move the file, or "
                                "point LOUPE_DATABASE_URL elsewhere") from None

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise sqlite3.DatabaseError(f"its schema is version {version}, newer than this Loupe's "
                                        f"({len(MIGRATIONS)})")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self._transaction():
                for statement in filter(str.strip, script.split(";")):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # Writes.

    def claim(self, row: RequestRow) -> bool:
        """Insert `row`, or replace the record under its id if that one has ended and has the same owner; in one
        statement, so two requests can't both take an id. Whether it was written."""
        values = _values(row)
        final = ", ".join(f"'{status}'" for status in FINAL)
        with self._lock, self._transaction():
            return self._db.execute(
                f"INSERT INTO requests ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
                f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _COLUMNS)} "
                f"WHERE requests.owner IS excluded.owner AND requests.status IN ({final})",
                [values[c] for c in _COLUMNS]).rowcount == 1

    def update(self, request_id: str, *, only_if: tuple[Status, ...] | None = None,
               **changes: Any) -> RequestRow | None:
        """Set `changes` on the record; with `only_if`, only while its status is one of those. The record as
        changed, or None when it wasn't."""
        assignments = {name: _column_value(name, value) for name, value in changes.items()}
        sql = f"UPDATE requests SET {', '.join(f'{name} = ?' for name in assignments)} WHERE id = ?"
        parameters = [*assignments.values(), request_id]
        if only_if:
            sql += f" AND status IN ({', '.join('?' * len(only_if))})"
            parameters += list(only_if)
        with self._lock, self._transaction():
            changed = self._db.execute(sql + f" RETURNING {', '.join(_COLUMNS)}", parameters).fetchone()
        return _row(changed) if changed else None

    def add_webhook_attempt(self, request_id: str, attempt: dict[str, Any]) -> None:
        with self._lock, self._transaction():
            self._db.execute("UPDATE requests SET webhook_attempts = json_insert(webhook_attempts, '$[#]', json(?)) "
                             "WHERE id = ?", (json.dumps(attempt), request_id))

    def expire(self, ttl_s: float, now: float | None = None) -> int:
        """Delete the records that ended more than `ttl_s` ago (never a pending or running one); how many."""
        cutoff = (time.time() if now is None else now) - ttl_s
        with self._lock, self._transaction():
            return self._db.execute(
                f"DELETE FROM requests WHERE completed_at < ? AND status IN ({', '.join('?' * len(FINAL))})",
                (cutoff, *FINAL)).rowcount

    # Reads.

    def get(self, request_id: str) -> RequestRow | None:
        with self._lock:
            cursor = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM requests WHERE id = ?", (request_id,))
            found = cursor.fetchone()
        return _row(found) if found else None

    def page(self, owner: str | None, *, status: Status | None, limit: int, after: str | None,
             every_owner: bool) -> tuple[list[RequestRow], bool]:
        """Newest first: up to `limit` records older than the record `after`, and whether more follow."""
        where, parameters = [], []
        if not every_owner:
            where.append("owner IS ?")
            parameters.append(owner)
        if status is not None:
            where.append("status = ?")
            parameters.append(status)
        if after is not None:
            where.append("(created, id) < (SELECT created, id FROM requests WHERE id = ?)")
            parameters.append(after)
        sql = (f"SELECT {', '.join(_COLUMNS)} FROM requests {'WHERE ' + ' AND '.join(where) if where else ''} "
               "ORDER BY created DESC, id DESC LIMIT ?")
        with self._lock:
            found = self._db.execute(sql, [*parameters, limit + 1]).fetchall()
        return [_row(values) for values in found[:limit]], len(found) > limit

    def undelivered(self) -> list[RequestRow]:
        """Ended requests with a webhook no attempt has delivered yet (a shutdown cut its retries short)."""
        with self._lock:
            found = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM requests WHERE webhook_url IS NOT NULL AND status IN "
                f"({', '.join('?' * len(FINAL))}) AND NOT EXISTS (SELECT 1 FROM json_each(webhook_attempts) "
                "WHERE json_extract(value, '$.delivered')) ORDER BY created, id", FINAL).fetchall()
        return [_row(values) for values in found]

    def with_status(self, *statuses: Status) -> list[RequestRow]:
        with self._lock:
            found = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM requests WHERE status IN "
                                     f"({', '.join('?' * len(statuses))}) ORDER BY created, id", statuses).fetchall()
        return [_row(values) for values in found]


def _values(row: RequestRow) -> dict[str, Any]:
    return {name: _column_value(name, getattr(row, name)) for name in _COLUMNS}


def _column_value(name: str, value: Any) -> Any:
    """A field of a `RequestRow` as its column stores it: JSON text, 0/1 for a flag."""
    if name in _JSON_COLUMNS:
        return None if value is None else json.dumps(value, separators=(",", ":"))
    return int(value) if name == "background" else value


def _row(values: tuple[Any, ...]) -> RequestRow:
    fields = dict(zip(_COLUMNS, values))
    for name in _JSON_COLUMNS:
        if fields[name] is not None:
            fields[name] = json.loads(fields[name])
    fields["background"] = bool(fields["background"])
    return RequestRow(**fields)
