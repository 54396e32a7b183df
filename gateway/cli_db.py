"""``pneumo db check|reindex``: the operator's side of the start-up checks (:mod:`storage.integrity`).

``check`` runs the checks ``pneumo serve`` runs at start, without changing anything, and says
what it found (exit 1 on a problem). ``reindex`` is the way out when the database was lost:
with the gateway stopped, it binds the database to the file store and rebuilds the index from
the files (:mod:`storage.reindex`), audited as an operator action.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import getpass
import json
import socket
import uuid
from pathlib import Path

from pydicom.dataset import Dataset

from audit.builders import operator_action
from audit.events import Code
from conf.settings import Settings
from dicom_node.reports import SR_SERIES_NUMBER, SUMMARY_SERIES_NUMBER
from dicom_node.sr import COMPREHENSIVE_3D_SR_SOP_CLASS_UID
from gateway.app import runtime_for
from storage.db import Database
from storage.integrity import (
    CheckReport,
    bind_database_identity,
    check_database_file,
    read_database_identity,
    read_marker,
    run_checks,
    write_marker,
)
from storage.reindex import reindex

#: A private code (PS3.16 §8.2: "99" designators are local): PS3.15 CID 401 has no event type
#: for "the index was rebuilt from the stored files".
INDEX_REBUILT = Code("INDEX-REBUILD", "99PNEUMO", "Operator rebuilt the index from the file store")
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


def _database(settings: Settings) -> Database:
    return Database(settings.effective_database_url, sqlite_synchronous=settings.storage.sqlite_synchronous)


def _missing_sqlite_file(database: Database) -> Path | None:
    """The SQLite file when it does not exist (opening it would create an empty one)."""
    name = database.url.database
    if database.is_sqlite and name and name != ":memory:" and not Path(name).exists():
        return Path(name)
    return None


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Run the start-up checks read-only; exit 1 when ``pneumo serve`` would refuse to start."""
    database = _database(settings)
    try:
        missing = _missing_sqlite_file(database)
        if missing is not None:
            report = CheckReport(problems=[f"the database file {missing} does not exist."])
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
            runtime.audit_source, operator=_operator(), host=socket.gethostname(), when=dt.datetime.now(dt.UTC),
            description="index rebuilt from the file store: " + ", ".join(f"{k}={v}" for k, v in summary.items()),
        )
        runtime.audit(dataclasses.replace(event, event_types=(INDEX_REBUILT,)))
    print(json.dumps({"ok": True, "store_id": store_id, **summary}))
    return 0


def _operator() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``db check|reindex`` to the ``pneumo`` command parser's *subparsers*."""
    db = subparsers.add_parser("db", help="database tools: start-up checks, rebuild the index from the files")
    actions = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="run the start-up checks without changing anything (exit 1 on a problem)")
    check.set_defaults(handler=cmd_check)
    rebuild = actions.add_parser(
        "reindex", help="rebuild the index from the file store and queue analysis (gateway stopped; audited)"
    )
    rebuild.set_defaults(handler=cmd_reindex)
