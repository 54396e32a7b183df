"""Start-up checks: refuse to serve on a damaged database or on one that does not index the store.

A gateway that answers C-STORE Success on top of a broken index breaks its promises later and
quietly: a damaged SQLite file makes queries fail "malformed" hours after start, and a deleted or
emptied database makes every acknowledged instance and the audit trail vanish from view while
the process looks healthy. Both are detected before anything is served:

1. **Database file** (SQLite): ``PRAGMA quick_check`` — every b-tree page is read and checked
   (O(size of the file), without the index-content cross-check of ``integrity_check``). A file
   that is not a database at all fails here too. PostgreSQL checks its own pages; a connection
   and a query are enough there.
2. **Store identity**: the database holds a random ``store_id`` (table ``store_identity``,
   migration 0006) and the file store holds the same id in :data:`MARKER_NAME` at its root,
   written together when the pair is first initialised. A deleted, emptied or replaced database
   no longer has the store's id; a store that is not mounted (or a wrong ``data_dir``) has no
   marker while the database has one.
3. **Index versus files** (cheap samples, never a full scan): files sampled from the store that
   the index does not know, and the newest indexed instances whose files are missing.

A crash legitimately leaves a few files in the store that no row points at: ingest renames the
file into place *before* its transaction commits, and a generated SR is placed before it is
indexed. Those transfers were never acknowledged and are harmless, so the sample tolerates
:func:`orphan_allowance` unknown files; only an index that misses a real share of the store is
refused. Nothing here deletes or rewrites data; the way out of a refusal is an operator's
decision (restore a backup, or ``pneumo db reindex``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, func, insert, inspect, select
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from audit.models import AuditRecord
from conf.errors import PneumoError
from storage.db import Database
from storage.filestore import fsync_dir
from storage.migrate import upgrade
from storage.models import Instance

#: The marker file at the root of the file store (hidden, so that no UID-named path can clash).
MARKER_NAME = ".pneumo-store.json"
#: How many store files the index-versus-files sample looks at (a directory walk that stops early).
FILE_SAMPLE = 2000
#: How many of the newest indexed instances must have their file.
NEWEST_SAMPLE = 32

_metadata = MetaData()
#: The one-row table of migration 0006 (Core, not ORM: nothing but this module reads it).
store_identity = Table(
    "store_identity",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("store_id", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


class StoreIntegrityError(PneumoError):
    """The database or the file store failed a start-up check; the process must not serve."""


@dataclass
class CheckReport:
    """What the checks found: ``problems`` refuse a start, ``warnings`` are only logged."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_failed(self) -> None:
        if self.problems:
            raise StoreIntegrityError(" ".join(self.problems))


# -- 1. the database file -------------------------------------------------------------------------


def check_database_file(database: Database, report: CheckReport) -> None:
    """SQLite: ``PRAGMA quick_check``; PostgreSQL: a round trip. Run *before* migrations, which
    would otherwise be the first to trip over a damaged file (with a traceback, not a reason)."""
    where = _database_label(database)
    try:
        with database.read_engine.connect() as connection:
            if database.is_sqlite:
                rows = [str(r[0]) for r in connection.exec_driver_sql("PRAGMA quick_check(10)").fetchall()]
                report.facts["quick_check"] = rows[:10]
                if rows != ["ok"]:
                    report.problems.append(
                        f"the database {where} is damaged (SQLite quick_check: {'; '.join(rows[:3])}). Move it aside "
                        "(keep it for investigation), then restore it from a backup or rebuild the index from the "
                        "files with `pneumo db reindex`."
                    )
            else:
                connection.exec_driver_sql("SELECT 1")
    except DBAPIError as exc:
        report.problems.append(
            f"the database {where} is damaged or unreadable ({_reason(exc)}). Move it aside (keep it for "
            "investigation), then restore it from a backup or rebuild the index from the files with "
            "`pneumo db reindex`."
        )


# -- 2. the store identity ------------------------------------------------------------------------


def read_marker(store_root: Path) -> str | None:
    """The store's id from its marker file, or None when there is none."""
    path = store_root / MARKER_NAME
    try:
        value = json.loads(path.read_text())["store_id"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreIntegrityError(f"the file store marker {path} is unreadable ({exc.__class__.__name__})") from exc
    if not isinstance(value, str) or not value:
        raise StoreIntegrityError(f"the file store marker {path} holds no store id")
    return value


def write_marker(store_root: Path, store_id: str) -> None:
    """Write the marker atomically and durably (temporary file, fsync, rename, fsync the dir)."""
    store_root.mkdir(parents=True, exist_ok=True)
    target = store_root / MARKER_NAME
    temporary = store_root / f"{MARKER_NAME}.{uuid.uuid4().hex}.tmp"
    body = json.dumps({"store_id": store_id, "written_at": dt.datetime.now(dt.UTC).isoformat()}) + "\n"
    with temporary.open("x") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    fsync_dir(store_root)


def read_database_identity(database: Database) -> str | None:
    """The store id the database holds, or None (no row, or a schema from before migration 0006)."""
    with database.read_engine.connect() as connection:
        if not inspect(connection).has_table("store_identity"):
            return None
        return connection.execute(select(store_identity.c.store_id).where(store_identity.c.id == 1)).scalar()


def bind_database_identity(database: Database, store_id: str) -> str:
    """Record *store_id* in the database unless it already holds one; return the one it holds.

    The single-row primary key arbitrates between two processes initialising at once."""
    with contextlib.suppress(IntegrityError), database.session() as session:
        session.execute(insert(store_identity).values(id=1, store_id=store_id, created_at=dt.datetime.now(dt.UTC)))
    held = read_database_identity(database)
    if held is None:  # pragma: no cover - the insert above either worked or met an existing row
        raise StoreIntegrityError("the database did not keep its store identity")
    return held


# -- 3. index versus files ------------------------------------------------------------------------


def iter_store_files(store_root: Path) -> Iterator[str]:
    """Relative paths of the instance files (``<study>/<series>/<sop>.dcm``), in directory order.

    Directory order (hash order on ext4/XFS) spreads a truncated walk over many studies."""
    with contextlib.suppress(FileNotFoundError):
        for study in _dirs(store_root):
            for series in _dirs(Path(study.path)):
                with contextlib.suppress(FileNotFoundError), os.scandir(series.path) as entries:
                    for entry in entries:
                        if entry.name.endswith(".dcm") and entry.is_file(follow_symlinks=False):
                            yield f"{study.name}/{series.name}/{entry.name}"


def _dirs(path: Path) -> list[os.DirEntry[str]]:
    with contextlib.suppress(FileNotFoundError), os.scandir(path) as entries:
        return [e for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    return []


def orphan_allowance(sampled: int) -> int:
    """Unknown files a legitimate crash may leave: one per in-flight C-STORE or generated object
    (tens per crash, a few crashes between clean-ups) — 64, or 10 % of a large sample."""
    return max(64, sampled // 10)


def _unknown_paths(database: Database, paths: list[str]) -> int:
    known: set[str] = set()
    with database.read_session() as session:
        for start in range(0, len(paths), 500):
            chunk = paths[start : start + 500]
            known.update(session.execute(select(Instance.path).where(Instance.path.in_(chunk))).scalars())
    return sum(1 for p in paths if p not in known)


def _missing_newest(database: Database, store_root: Path) -> tuple[int, int]:
    with database.read_session() as session:
        paths = list(session.execute(select(Instance.path).order_by(Instance.id.desc()).limit(NEWEST_SAMPLE)).scalars())
    return sum(1 for p in paths if not (store_root / p).is_file()), len(paths)


def _counts(database: Database) -> tuple[int, int]:
    with database.read_session() as session:
        instances = session.execute(select(func.count()).select_from(Instance)).scalar_one()
        audit = session.execute(select(func.count()).select_from(AuditRecord)).scalar_one()
    return int(instances), int(audit)


# -- all of it ------------------------------------------------------------------------------------


def check_store(database: Database, store_root: Path, report: CheckReport, *, initialise: bool) -> None:
    """Checks 2 and 3 on a migrated database; with *initialise*, bind a fresh pair (first start,
    or the first start after upgrading to migration 0006) by writing the identity on both sides."""
    marker = read_marker(store_root)
    held = read_database_identity(database)
    with database.read_engine.connect() as connection:
        has_schema = inspect(connection).has_table(Instance.__tablename__)
    instances, audit_records = _counts(database) if has_schema else (0, 0)
    sample = list(_take(iter_store_files(store_root), FILE_SAMPLE))
    report.facts.update(
        {"store_marker": marker, "database_store_id": held, "instances_indexed": instances,
         "audit_records": audit_records, "files_sampled": len(sample)}
    )
    where, store = _database_label(database), str(store_root)
    rebuild = "restore the database from a backup, or rebuild the index from the files with `pneumo db reindex`"

    if marker is not None and held is not None and marker != held:
        report.problems.append(
            f"the database {where} indexes another file store (store id {held}), not the one at {store} "
            f"(store id {marker}). Point database_url / data_dir at the matching pair, or {rebuild} into an empty "
            "database."
        )
        return
    if marker is not None and held is None:
        if sample or instances:
            report.problems.append(
                f"the database {where} does not know the file store at {store}: it holds no store identity, "
                f"{instances} indexed instance(s) and {audit_records} audit record(s) while the store holds instance "
                f"files: it was deleted, emptied or replaced while the gateway was stopped. To go on, {rebuild}."
            )
            return
        _initialise(database, store_root, marker, report, initialise=initialise)  # nothing stored yet
    elif marker is None and held is not None:
        if sample or instances:
            report.problems.append(
                f"the file store at {store} has no identity marker ({MARKER_NAME}) but the database {where} was "
                f"initialised with store {held}: is data_dir right and its volume mounted? If this really is the "
                "store of this database, `pneumo db reindex` marks it again (and indexes what is missing)."
            )
            return
        _initialise(database, store_root, held, report, initialise=initialise)  # a first start cut short
    elif marker is None and held is None:
        if sample and instances == 0 and audit_records == 0:
            report.problems.append(
                f"the database {where} is new or empty but the file store at {store} holds instance files: the "
                f"database was deleted or emptied while the gateway was stopped. To go on, {rebuild}."
            )
            return
        _initialise(database, store_root, uuid.uuid4().hex, report, initialise=initialise)

    if not has_schema:
        return  # `pneumo db check` before any migration: nothing more to compare
    if sample and instances == 0 and audit_records == 0:
        report.problems.append(
            f"the database {where} holds no instance and no audit record but the file store at {store} holds "
            f"instance files: the database was emptied while the gateway was stopped. To go on, {rebuild}."
        )
        return
    unknown = _unknown_paths(database, sample) if sample else 0
    missing, newest = _missing_newest(database, store_root)
    report.facts.update({"files_unknown": unknown, "newest_checked": newest, "newest_missing": missing})
    if unknown > orphan_allowance(len(sample)):
        report.problems.append(
            f"the database {where} does not know {unknown} of {len(sample)} instance files sampled from the store at "
            f"{store} (a crash leaves at most a few): it lost rows while the gateway was stopped (an old backup, or "
            f"rows deleted). To go on, {rebuild}."
        )
    elif unknown:
        report.warnings.append(f"{unknown} file(s) in the store are not indexed (transfers cut short by a crash)")
    if newest and missing == newest:
        report.problems.append(
            f"none of the {newest} newest indexed instances has its file under {store}: is data_dir right and its "
            "volume mounted? The gateway would acknowledge and index instances it cannot serve."
        )
    elif missing:
        report.warnings.append(f"{missing} of the {newest} newest indexed instances have no file in the store")


def _initialise(database: Database, store_root: Path, store_id: str, report: CheckReport, *, initialise: bool) -> None:
    if not initialise:
        report.warnings.append("the database and the file store are not bound yet (done by the next `pneumo serve`)")
        return
    held = bind_database_identity(database, store_id)
    write_marker(store_root, held)
    report.facts["store_marker"] = report.facts["database_store_id"] = held
    report.facts["initialised"] = True


def run_checks(database: Database, store_root: Path, *, initialise: bool, migrate: bool = True) -> CheckReport:
    """Every check, in order, stopping at the first failing stage; *migrate* upgrades the schema
    between the file check and the store checks (what ``pneumo serve`` does)."""
    report = CheckReport()
    check_database_file(database, report)
    if not report.ok:
        return report
    try:
        if migrate:
            upgrade(database)
        check_store(database, store_root, report, initialise=initialise)
    except SQLAlchemyError as exc:
        report.problems.append(f"the database {_database_label(database)} failed a start-up query ({_reason(exc)}).")
    except StoreIntegrityError as exc:
        report.problems.append(str(exc))
    return report


def _take(items: Iterator[str], limit: int) -> Iterator[str]:
    for count, item in enumerate(items):
        if count >= limit:
            return
        yield item


def _database_label(database: Database) -> str:
    """Where the database is, without credentials (logs and messages carry no secrets)."""
    if database.is_sqlite:
        return f"file {database.url.database}"
    return f"{database.url.get_backend_name()} database {database.url.database} on {database.url.host}"


def _reason(exc: BaseException) -> str:
    original = getattr(exc, "orig", None)
    return f"{(original or exc).__class__.__name__}: {str(original or exc).splitlines()[0][:200]}"
