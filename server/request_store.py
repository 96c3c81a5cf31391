"""Request records in SQLite: every edit's status, result and error, and an async job's inputs until it ends.

One embedded database in the data dir (`LOUPE_DATABASE_URL`), in WAL mode so readers never wait for the
writer; one connection shared under a lock. A record belongs to the API key that made it: its key is
(owner, id), so two keys may use the same request id without meeting. The schema carries its version
(`PRAGMA user_version`) and is brought up to date by the migrations below, in order, at start-up; a table
whose columns are not the ones this Loupe knows stops the start-up.

Faults are domain errors: a database another process keeps locked past the caller's patience is
`RecordsBusy` (it clears by itself), a full disk `StorageFull`, anything else `Unavailable`. A file
deleted or replaced under the running server is noticed (`vanished`), its records saved beside it, and at
the next start a missing database that Loupe made before is an error, never silently a new empty one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse

from server.config import Settings, SettingsError
from server.errors import LoupeError, RecordsBusy, StorageFull, Unavailable

log = logging.getLogger("loupe.records")
T = TypeVar("T")

Status = Literal["pending", "processing", "completed", "failed", "cancelled"]
FINAL: tuple[Status, ...] = ("completed", "failed", "cancelled")
NO_OWNER = ""  # the owner of every record on a server without API keys

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
    # Version 2: request ids are each API key's own, so the key is (owner, id).
    """
    CREATE TABLE requests_v2 (
        owner TEXT NOT NULL,
        id TEXT NOT NULL,
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
        webhook_attempts TEXT NOT NULL DEFAULT '[]',
        PRIMARY KEY (owner, id)
    );
    INSERT INTO requests_v2 (owner, id, status, created, started_at, completed_at, model, executed_model, provider,
                             cost, background, webhook_url, job, result, error, webhook_attempts)
        SELECT COALESCE(owner, ''), id, status, created, started_at, completed_at, model, executed_model, provider,
               cost, background, webhook_url, job, result, error, webhook_attempts FROM requests;
    DROP TABLE requests;
    ALTER TABLE requests_v2 RENAME TO requests;
    CREATE INDEX requests_by_time ON requests (owner, created DESC, id DESC);
    CREATE INDEX requests_by_end ON requests (completed_at) WHERE completed_at IS NOT NULL;
    """,
)

_BUSY_TIMEOUT_MS = 100  # SQLite's own wait on a lock; longer waits are the caller's patience, in `_call`
_BUSY, _LOCKED, _FULL = 5, 6, 13  # SQLite's primary result codes


@dataclass
class RequestRow:
    id: str
    owner: str | None  # a digest of the API key that sent it; None on a server without keys
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
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM requests"


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


def marker_path(path: Path) -> Path:
    """The file that says Loupe made the database at `path`: without the database, a start-up error."""
    return path.with_name(path.name + ".id")


def rescued_path(path: Path) -> Path:
    """Where the records of a database deleted or replaced under the running server are saved."""
    return path.with_name(path.name + ".rescued")


class RequestStore:
    def __init__(self, path: Path) -> None:
        """Open (or create) the database and migrate it; SettingsError naming the file when it can't be used."""
        self.path = path
        self._lock = threading.Lock()
        self._problem: str | None = None  # why the file at `path` is no longer this store's, once noticed
        marker = marker_path(path)
        if not path.exists() and marker.exists():
            rescued = rescued_path(path)
            copy = f" ({rescued} holds the records saved when it vanished)" if rescued.exists() else ""
            raise SettingsError(f"the request database {path} is missing, but Loupe made one there before{copy}; "
                                f"restore it, or delete {marker} to start with an empty one")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            if self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise sqlite3.OperationalError("it can't be put in WAL mode")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
            self._check_columns()
            self._db.execute("BEGIN IMMEDIATE")  # proves the file is writable now, not at the first request
            self._db.execute("ROLLBACK")
            info = path.stat()
            self._identity = (info.st_dev, info.st_ino)
            if not marker.exists():
                marker.write_text(f"Loupe keeps its request records in {path.name}; without it, Loupe won't start "
                                  "with an empty one unless this file is deleted.\n")
        except (sqlite3.Error, OSError) as error:
            with contextlib.suppress(Exception):
                self._db.close()
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

    def _check_columns(self) -> None:
        found = [row[1] for row in self._db.execute("PRAGMA table_info(requests)")]
        if sorted(found) != sorted(_COLUMNS):
            foreign = sorted(set(found) - set(_COLUMNS)) or sorted(set(_COLUMNS) - set(found))
            raise sqlite3.DatabaseError(f"its requests table is not the one this Loupe knows (columns "
                                        f"{', '.join(foreign) or 'none'} differ)")

    def close(self) -> None:
        """Close the database; one deleted or replaced meanwhile has its last records saved beside it first."""
        noticed_before = self._problem is not None
        self.vanished()
        with self._lock:
            if noticed_before:  # saved when it was noticed: save again, with what was written since
                self._rescue_if_orphaned()
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
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _call(self, operation: Callable[[], T], patience_s: float) -> T:
        """`operation()` under the lock; a lock another process holds is waited out for `patience_s`, with backoff.
        SQLite's failures become domain errors."""
        deadline = time.monotonic() + patience_s
        delay = 0.02
        while True:
            try:
                with self._lock:
                    return operation()
            except sqlite3.Error as error:
                code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
                busy = code in (_BUSY, _LOCKED) or "locked" in str(error) or "busy" in str(error)
                if busy and time.monotonic() + delay < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                raise self._fault(error, busy, code) from None

    @staticmethod
    def _fault(error: sqlite3.Error, busy: bool, code: int) -> LoupeError:
        """The caller logs it, once for a run of refusals: a locked database is retried many times."""
        if busy:
            return RecordsBusy("the request database is locked by another process; retry shortly")
        if code == _FULL or "full" in str(error):
            return StorageFull("the server's disk is full, so it can't record requests now; try again later, or "
                               "send the edit synchronously with response_format=b64_json")
        return Unavailable(f"the server's request database failed ({error}); tell the operator",
                           code="DATABASE_UNAVAILABLE", transient=False)

    # The file itself.

    def vanished(self) -> str | None:
        """Why the database this store opened is no longer the file at its path (deleted or replaced), or None.
        The first time, the open database's records are saved beside it, and the log says so."""
        if self._problem is not None:
            return self._problem
        try:
            info = os.stat(self.path)
            moved = None if (info.st_dev, info.st_ino) == self._identity else "replaced by another file"
        except OSError as error:
            moved = "deleted" if isinstance(error, FileNotFoundError) else f"unreadable ({error.strerror})"
        if moved is None:
            return None
        with self._lock:
            self._problem = (f"the request database {self.path.name} was {moved} while Loupe was running; records "
                             f"are kept in the one it opened and saved to {rescued_path(self.path).name}: stop Loupe, "
                             "put that file back in place and start it again")
            self._rescue_if_orphaned()
        return self._problem

    def _rescue_if_orphaned(self) -> None:
        """Called under the lock: the open database's records, saved beside the file that replaced it."""
        if self._problem is None:
            return
        target = rescued_path(self.path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            copy = sqlite3.connect(target)
            try:
                self._db.backup(copy)
            finally:
                copy.close()
            log.error("the request database was moved under the running server; its records are saved",
                      extra={"database": str(self.path), "saved_to": str(target), "why": self._problem})
        except (sqlite3.Error, OSError) as error:
            log.error("the request database was moved under the running server, and its records could not be saved",
                      extra={"database": str(self.path), "error": str(error), "why": self._problem})

    # Writes.

    def claim(self, row: RequestRow, patience_s: float = 0.0) -> bool:
        """Insert `row`, or replace its owner's record under its id if that one has ended; in one statement, so two
        requests can't both take an id. Whether it was written."""
        values = _values(row)
        final = ", ".join(f"'{status}'" for status in FINAL)
        sql = (f"INSERT INTO requests ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
               f"ON CONFLICT (owner, id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _COLUMNS)} "
               f"WHERE requests.status IN ({final})")

        def insert() -> bool:
            with self._transaction():
                return self._db.execute(sql, [values[c] for c in _COLUMNS]).rowcount == 1

        return self._call(insert, patience_s)

    def update(self, owner: str | None, request_id: str, *, only_if: tuple[Status, ...] | None = None,
               patience_s: float = 0.0, **changes: Any) -> RequestRow | None:
        """Set `changes` on the record; with `only_if`, only while its status is one of those. The record as
        changed, or None when it wasn't."""
        assignments = {name: _column_value(name, value) for name, value in changes.items()}
        sql = f"UPDATE requests SET {', '.join(f'{name} = ?' for name in assignments)} WHERE owner = ? AND id = ?"
        parameters = [*assignments.values(), _owner(owner), request_id]
        if only_if:
            sql += f" AND status IN ({', '.join('?' * len(only_if))})"
            parameters += list(only_if)

        def change() -> tuple[Any, ...] | None:
            with self._transaction():
                return self._db.execute(sql + f" RETURNING {', '.join(_COLUMNS)}", parameters).fetchone()

        changed = self._call(change, patience_s)
        return _row(changed) if changed else None

    def add_webhook_attempt(self, owner: str | None, request_id: str, attempt: dict[str, Any],
                            patience_s: float = 0.0) -> None:
        def append() -> None:
            with self._transaction():
                self._db.execute("UPDATE requests SET webhook_attempts = json_insert(webhook_attempts, '$[#]', "
                                 "json(?)) WHERE owner = ? AND id = ?", (json.dumps(attempt), _owner(owner), request_id))

        self._call(append, patience_s)

    def expire(self, ttl_s: float, now: float | None = None, patience_s: float = 0.0) -> int:
        """Delete the records that ended more than `ttl_s` ago (never a pending or running one); how many."""
        cutoff = (time.time() if now is None else now) - ttl_s

        def delete() -> int:
            with self._transaction():
                return self._db.execute(
                    f"DELETE FROM requests WHERE completed_at < ? AND status IN ({', '.join('?' * len(FINAL))})",
                    (cutoff, *FINAL)).rowcount

        return self._call(delete, patience_s)

    # Reads.

    def get(self, owner: str | None, request_id: str, patience_s: float = 0.0) -> RequestRow | None:
        found = self._call(lambda: self._db.execute(f"{_SELECT} WHERE owner = ? AND id = ?",
                                                    (_owner(owner), request_id)).fetchone(), patience_s)
        return _row(found) if found else None

    def page(self, owner: str | None, *, status: Status | None, limit: int, after: str | None,
             patience_s: float = 0.0) -> tuple[list[RequestRow], bool]:
        """The owner's records, newest first: up to `limit` older than its record `after`, and whether more follow."""
        where, parameters = ["owner = ?"], [_owner(owner)]
        if status is not None:
            where.append("status = ?")
            parameters.append(status)
        if after is not None:
            where.append("(created, id) < (SELECT created, id FROM requests WHERE owner = ? AND id = ?)")
            parameters += [_owner(owner), after]
        sql = f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY created DESC, id DESC LIMIT ?"
        found = self._call(lambda: self._db.execute(sql, [*parameters, limit + 1]).fetchall(), patience_s)
        return [_row(values) for values in found[:limit]], len(found) > limit

    def undelivered(self, patience_s: float = 0.0) -> list[RequestRow]:
        """Ended requests with a webhook no attempt has delivered yet (a shutdown cut its retries short)."""
        found = self._call(lambda: self._db.execute(
            f"{_SELECT} WHERE webhook_url IS NOT NULL AND status IN ({', '.join('?' * len(FINAL))}) AND NOT EXISTS "
            "(SELECT 1 FROM json_each(webhook_attempts) WHERE json_extract(value, '$.delivered')) ORDER BY created, id",
            FINAL).fetchall(), patience_s)
        return [_row(values) for values in found]

    def with_status(self, *statuses: Status, patience_s: float = 0.0) -> list[RequestRow]:
        found = self._call(lambda: self._db.execute(
            f"{_SELECT} WHERE status IN ({', '.join('?' * len(statuses))}) ORDER BY created, id",
            statuses).fetchall(), patience_s)
        return [_row(values) for values in found]


def _owner(owner: str | None) -> str:
    return NO_OWNER if owner is None else owner


def _values(row: RequestRow) -> dict[str, Any]:
    return {name: _column_value(name, getattr(row, name)) for name in _COLUMNS}


def _column_value(name: str, value: Any) -> Any:
    """A field of a `RequestRow` as its column stores it: JSON text, 0/1 for a flag, '' for no owner."""
    if name in _JSON_COLUMNS:
        return None if value is None else json.dumps(value, separators=(",", ":"))
    if name == "owner":
        return _owner(value)
    return int(value) if name == "background" else value


def _row(values: tuple[Any, ...]) -> RequestRow:
    fields = dict(zip(_COLUMNS, values))
    for name in _JSON_COLUMNS:
        if fields[name] is not None:
            fields[name] = json.loads(fields[name])
    fields["background"] = bool(fields["background"])
    fields["owner"] = fields["owner"] or None
    return RequestRow(**fields)
