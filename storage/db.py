"""Engine and session factory: one :class:`Database` per process (docs/architecture.md §6.6).

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` so that a commit is on
disk when it returns, and every write transaction starts with ``BEGIN IMMEDIATE``: SQLite allows
one writer at a time, and taking the write lock up front turns would-be deadlocks between
concurrent associations into a short wait. Read-only sessions use a deferred BEGIN so that
readers never queue behind writers. PostgreSQL (psycopg 3) needs none of this.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from conf.errors import NotFoundError

#: The table Alembic keeps its revision in: every database our migrations ever touched has it.
SCHEMA_MARKER_TABLE = "alembic_version"


class StoreNotFoundError(NotFoundError):
    """There is no Pneumo store where the settings point: no SQLite file, or a database without
    our schema. Raised instead of creating an empty one (``pneumo instances`` in the wrong folder)."""


_WAL_SWITCH_SECONDS = 60.0


def _use_wal(cursor: Any) -> None:
    """Put the database file in WAL mode (a property of the file: once set, every later connection
    finds it so). Switching needs the file to itself, and SQLite answers "database is locked" at
    once, without its busy handler, while another process holds a lock: so the switch is asked for
    only when the file is not in WAL mode yet, and retried while processes start together on a new
    file (seen: 4 processes migrating a new database at once)."""
    deadline = time.monotonic() + _WAL_SWITCH_SECONDS
    delay = 0.01
    while True:
        mode = str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        if mode == "wal" or mode == "memory":
            return
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


class Database:
    """Owns the engines and hands out sessions; pass it explicitly to whoever needs the DB."""

    def __init__(
        self,
        url: str,
        *,
        sqlite_synchronous: str = "FULL",
        echo: bool = False,
        session_info: Mapping[str, object] | None = None,
        create: bool = True,
    ) -> None:
        """*session_info* is copied into every session's ``Session.info``.

        It carries process-wide collaborators that code deep inside a transaction needs without
        threading them through every call: the audit signer (``audit.store.signer_session_info``),
        which ``audit.store.append`` reads, so its many call sites seal records with the HMAC key
        without each being handed the key.

        *create* False: create nothing, not even the folder of a SQLite file; see
        :func:`open_existing`, which readers use so that a wrong path fails instead of making a store.
        """
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            database = self.url.database
            if create and database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = self._sqlite_engine(url, immediate=True, synchronous=sqlite_synchronous, echo=echo)
            self.read_engine = self._sqlite_engine(url, immediate=False, synchronous=sqlite_synchronous, echo=echo)
        else:
            self.engine = create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20)
            self.read_engine = self.engine
        self._write_lock: contextlib.AbstractContextManager[object] = (
            threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        )
        info = dict(session_info or {})
        self._sessions = sessionmaker(self.engine, expire_on_commit=False, info=info)
        self._read_sessions = sessionmaker(self.read_engine, expire_on_commit=False, info=info)

    @staticmethod
    def _sqlite_engine(url: str, *, immediate: bool, synchronous: str, echo: bool) -> Engine:
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": 60},
            pool_size=20,
            max_overflow=20,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Hand transaction control to SQLAlchemy's BEGIN below (pysqlite's own is broken).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            _use_wal(cursor)
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            connection.exec_driver_sql(begin)

        return engine

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A write transaction: committed when the block exits normally, rolled back otherwise.

        On SQLite, writers of this process queue on a lock first: SQLite's own busy handler
        waits by sleeping in growing steps (up to 100 ms), so four associations contending for
        the one write lock would spend more time asleep than writing. Other processes (e.g.
        ``pneumo worker``) still meet at SQLite's lock, with the busy timeout.
        """
        with self._write_lock, self._sessions.begin() as session:
            yield session

    @contextlib.contextmanager
    def read_session(self) -> Iterator[Session]:
        """A read-only unit of work (never blocks on, nor blocks, the single SQLite writer)."""
        # close() (at the end of the with) releases the connection, rolling back its transaction,
        # and detaches the loaded objects without expiring them, so callers may still read them.
        with self._read_sessions() as session:
            yield session

    def ping(self) -> bool:
        try:
            with self.read_engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - any failure means "not reachable"
            return False

    @property
    def display_url(self) -> str:
        """The URL to show an operator (:func:`display_url`)."""
        return display_url(self.url.render_as_string(hide_password=False))

    def dispose(self) -> None:
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()


def display_url(url: str) -> str:
    """*url* as shown to an operator: password hidden, a SQLite path made absolute."""
    parsed = make_url(url)
    name = parsed.database
    if parsed.get_backend_name() == "sqlite" and name and name != ":memory:":
        parsed = parsed.set(database=str(Path(name).resolve()))
    return parsed.render_as_string(hide_password=True)


def missing_sqlite_file(url: str) -> Path | None:
    """The SQLite file *url* names when it does not exist (connecting would create it), else None."""
    parsed = make_url(url)
    name = parsed.database
    if parsed.get_backend_name() == "sqlite" and name and name != ":memory:" and not Path(name).is_file():
        return Path(name)
    return None


def open_existing(url: str, *, sqlite_synchronous: str = "FULL", session_info: Mapping[str, object] | None = None) -> Database:
    """Open the store's database only if it exists and holds our schema; create nothing.

    For SQLite the file must exist before the first connection (connecting creates it); for any
    backend the schema must be there (Alembic's revision table), so an empty database is refused
    too. Raises :class:`StoreNotFoundError` naming the database (password hidden).
    """
    missing = missing_sqlite_file(url)
    if missing is not None:
        raise StoreNotFoundError(f"no database file at {missing.resolve()}")
    database = Database(url, sqlite_synchronous=sqlite_synchronous, session_info=session_info, create=False)
    try:
        with database.read_engine.connect() as connection:
            has_schema = inspect(connection).has_table(SCHEMA_MARKER_TABLE)
    except DBAPIError as exc:
        database.dispose()
        cause = exc.orig if exc.orig is not None else exc
        detail = (str(cause).strip().splitlines() or [""])[0][:200]
        raise StoreNotFoundError(
            f"cannot open the database {database.display_url}: {cause.__class__.__name__}: {detail}"
        ) from exc
    if not has_schema:
        database.dispose()
        raise StoreNotFoundError(f"the database {database.display_url} holds no Pneumo store (no schema)")
    return database
