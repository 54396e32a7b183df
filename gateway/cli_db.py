"""``pneumo db check|reindex|upgrade``: the operator's side of the start-up checks (:mod:`storage.integrity`).

``check`` runs the checks ``pneumo serve`` runs at start, without changing anything, and says
what it found (exit 1 on a problem). ``reindex`` is the way out when the database was lost:
with the gateway stopped, it binds the database to the file store and rebuilds the index from
the files (:mod:`storage.reindex`), audited as an operator action. ``upgrade`` applies the schema
migrations for operators whose gateway runs as a role that may not change the schema
(docs/audit.md, "Append-only in the database"): run as the owner, it does what ``pneumo serve``
does at start, and only that, and is audited as an operator action (docs/operations.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import socket
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import structlog
from pydicom.dataset import Dataset

from audit.anchor import load_signer
from audit.builders import operator_action
from audit.events import AuditSource, Code
from audit.store import append as append_audit
from audit.store import signer_session_info
from conf.errors import ConflictError
from conf.settings import DEFAULT_CONFIG_FILE, Settings
from dicom_node.reports import SR_SERIES_NUMBER, SUMMARY_SERIES_NUMBER
from dicom_node.sr import COMPREHENSIVE_3D_SR_SOP_CLASS_UID
from gateway.app import runtime_for
from gateway.cli_help import add_command, operator_name
from storage.db import Database, StoreNotFoundError, missing_sqlite_file, open_existing
from storage.integrity import (
    CheckReport,
    bind_database_identity,
    check_database_file,
    read_database_identity,
    read_marker,
    run_checks,
    write_marker,
)
from storage.migrate import current_revision, is_current, upgrade
from storage.reindex import reindex

log = structlog.get_logger(__name__)

#: A private code (PS3.16 §8.2: "99" designators are local): PS3.15 CID 401 has no event type
#: for "the index was rebuilt from the stored files".
INDEX_REBUILT = Code("INDEX-REBUILD", "99PNEUMO", "Operator rebuilt the index from the file store")
SCHEMA_UPGRADED = Code("SCHEMA-UPGRADE", "99PNEUMO", "Operator upgraded the database schema")
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


def _database(settings: Settings, *, create: bool = True) -> Database:
    return Database(
        settings.effective_database_url, sqlite_synchronous=settings.storage.sqlite_synchronous, create=create
    )


def config_in_use(config: Path | None) -> Path | None:
    """The configuration file :func:`conf.settings.load_settings` read for *config* (None: defaults)."""
    if config is not None:
        return config.resolve()
    return DEFAULT_CONFIG_FILE.resolve() if DEFAULT_CONFIG_FILE.is_file() else None


def describe_config(config: Path | None) -> str:
    used = config_in_use(config)
    return str(used) if used is not None else f"none (no --config, no $PNEUMO_CONFIG, no pneumo.toml in {Path.cwd()})"


def announce_store(config: Path | None, database_url: str) -> None:
    """The stderr line that says which configuration and which database a command used."""
    log.info("cli.store", config=describe_config(config), database=database_url)


@contextlib.contextmanager
def existing_store(
    settings: Settings, config: Path | None, *, require_current: bool = True, session_info: Mapping[str, object] | None = None
) -> Iterator[Database]:
    """The store's database, only if it exists (never created, never migrated): for the commands
    that read it. Raises :class:`StoreNotFoundError` naming the configuration, or
    :class:`ConflictError` when its schema is older than this version (``pneumo serve`` migrates)."""
    try:
        database = open_existing(settings.effective_database_url, sqlite_synchronous=settings.storage.sqlite_synchronous,
                                 session_info=session_info)
    except StoreNotFoundError as exc:
        raise StoreNotFoundError(
            f"no store: {exc} (configuration: {describe_config(config)}). Run from the gateway's folder, or give its "
            "configuration with --config PATH or PNEUMO_CONFIG; `pneumo serve` creates the store."
        ) from exc
    try:
        if require_current and not is_current(database):
            raise ConflictError(
                f"the database {database.display_url} is not at this version's schema: `pneumo serve` (or "
                "`pneumo worker`) of this version migrates it when it starts; this command does not change it"
            )
        announce_store(config, database.display_url)
        yield database
    finally:
        database.dispose()


def require_store(settings: Settings, config: Path | None) -> None:
    """Fail like :func:`existing_store` when there is no store; for commands that then write to it."""
    with existing_store(settings, config, require_current=False):
        pass


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Run the start-up checks read-only; exit 1 when ``pneumo serve`` would refuse to start."""
    database = _database(settings, create=False)  # a check creates nothing, not even the folder
    announce_store(args.config, database.display_url)
    try:
        missing = missing_sqlite_file(settings.effective_database_url)
        if missing is not None:
            report = CheckReport(problems=[f"the database file {missing.resolve()} does not exist."])
            if read_marker(settings.dicom_dir) is not None:
                report.problems.append("The file store is marked: restore the database or run `pneumo db reindex`.")
        else:
            report = run_checks(database, settings.dicom_dir, initialise=False, migrate=False)
    finally:
        database.dispose()
    print(json.dumps({"ok": report.ok, "problems": report.problems, "warnings": report.warnings, "facts": report.facts}))
    return 0 if report.ok else 1


def is_generated(dataset: Dataset) -> bool:
    """Our own SR or summary image (fixed series numbers, docs/sr.md), not a received object."""
    sop_class = str(dataset.get("SOPClassUID", ""))
    series_number = dataset.get("SeriesNumber")
    ours = sop_class == COMPREHENSIVE_3D_SR_SOP_CLASS_UID or sop_class.startswith(_SECONDARY_CAPTURE_PREFIX)
    return ours and series_number in (SR_SERIES_NUMBER, SUMMARY_SERIES_NUMBER)


def cmd_reindex(args: argparse.Namespace, settings: Settings) -> int:
    """Bind the database to the store and index every file it does not know (never deletes)."""
    database = _database(settings)
    try:
        report = CheckReport()
        check_database_file(database, report)
    finally:
        database.dispose()
    if not report.ok:
        print(json.dumps({"ok": False, "error": " ".join(report.problems)}))
        return 2
    with runtime_for(settings) as runtime:
        marker = read_marker(runtime.store.root)
        held = read_database_identity(runtime.database)
        if marker is not None and held is not None and marker != held:
            print(json.dumps({"ok": False, "error": (
                f"the database indexes another file store (store id {held}, this store is {marker}); "
                "reindex into an empty database instead"
            )}))
            return 2
        store_id = bind_database_identity(runtime.database, held or marker or uuid.uuid4().hex)
        write_marker(runtime.store.root, store_id)
        result = reindex(runtime.database, runtime.store, is_generated=is_generated)
        summary = result.as_dict()
        event = operator_action(
            runtime.audit_source, operator=operator_name(), host=socket.gethostname(), when=dt.datetime.now(dt.UTC),
            description="index rebuilt from the file store: " + ", ".join(f"{k}={v}" for k, v in summary.items()),
        )
        runtime.audit(dataclasses.replace(event, event_types=(INDEX_REBUILT,)))
    print(json.dumps({"ok": True, "store_id": store_id, **summary}))
    return 0


def cmd_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    """Migrate the schema to this version's head, print from/to, and audit it (signed with the
    configured HMAC key, like every record: run it with the gateway's own configuration)."""
    missing = missing_sqlite_file(settings.effective_database_url)
    if missing is not None:  # a SQLite store is made by `pneumo serve`; a typo must not make an empty one
        raise StoreNotFoundError(f"no database file at {missing.resolve()} (configuration: {describe_config(args.config)})")
    signer = load_signer(settings.audit.hmac_key_file, settings.audit.retired_hmac_key_files)
    database = Database(settings.effective_database_url, sqlite_synchronous=settings.storage.sqlite_synchronous,
                        session_info=signer_session_info(signer))
    announce_store(args.config, database.display_url)
    try:
        before = current_revision(database)
        upgrade(database)
        after = current_revision(database)
        host = socket.gethostname()
        description = (f"database schema upgraded from {before or 'none'} to {after}" if before != after
                       else f"database schema upgrade: already at {after}")
        event = operator_action(
            AuditSource(source_id=f"{settings.dicom.ae_title}@{host}"), operator=operator_name(), host=host,
            when=dt.datetime.now(dt.UTC), description=description,
        )
        with database.session() as session:
            append_audit(session, dataclasses.replace(event, event_types=(SCHEMA_UPGRADED,)))
    finally:
        database.dispose()
    print(json.dumps({"ok": True, "database": database.display_url, "from": before, "to": after,
                      "changed": before != after}))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``db check|reindex`` to the ``pneumo`` command parser's *subparsers*."""
    db = add_command(
        subparsers, "db", summary="database tools: start-up checks, rebuild the index from the files, schema upgrade",
        description="The operator's side of the start-up checks that `pneumo serve` runs before it listens.",
        examples=["pneumo db check", "pneumo db reindex --config /etc/pneumo/pneumo.toml", "pneumo db upgrade"],
    )
    actions = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    check = add_command(
        actions, "check", summary="run the start-up checks without changing anything (exit 1 on a problem)",
        description=(
            "Run the checks `pneumo serve` runs at start (SQLite quick_check, the database indexes this file\n"
            "store, the newest files are indexed) without creating or changing anything. Prints one JSON\n"
            "object {ok, problems, warnings, facts}; exit 1 when `pneumo serve` would refuse to start."
        ),
        examples=["pneumo db check"],
    )
    check.set_defaults(handler=cmd_check)
    rebuild = add_command(
        actions, "reindex", summary="rebuild the index from the file store and queue analysis (gateway stopped; audited)",
        description=(
            "After a lost or replaced database: bind the database to the file store and index every file it\n"
            "does not know, queueing analysis again. Run it with the gateway stopped. Never deletes; audited\n"
            "as an operator action. Creates the database when there is none (the one command besides\n"
            "`serve` and `worker` that does)."
        ),
        examples=["pneumo db reindex"],
    )
    rebuild.set_defaults(handler=cmd_reindex)
    schema = add_command(
        actions, "upgrade", summary="apply the schema migrations as the schema owner (gateway stopped; audited)",
        description=(
            "Bring the database schema to this version (what `pneumo serve` does at start), for gateways\n"
            "that run as a role that may not change the schema: run it as the owner, with the gateway's\n"
            "configuration and the owner's URL (PNEUMO_DATABASE_URL=...), the gateway stopped. Creates\n"
            "the schema in an empty PostgreSQL database (a new install); refuses a missing SQLite file.\n"
            "Prints {ok, database, from, to, changed}; audited as an operator action (with the HMAC key\n"
            "of [audit] hmac_key_file, so the audit log stays verifiable). docs/operations.md, \"Upgrade\"."
        ),
        examples=["PNEUMO_DATABASE_URL=postgresql+psycopg://pneumo_owner@db/pneumo pneumo db upgrade"],
    )
    schema.set_defaults(handler=cmd_upgrade)
