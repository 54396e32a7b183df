"""``pneumo keys generate|status|rotate``: the operator's side of encryption at rest.

Thin: the key file is written by :func:`storage.keyring.generate_key_file`, the walk and the
per-file re-encryption are :func:`storage.rotation.rotate_store`. ``rotate`` runs as its own
process next to ``pneumo serve`` (it needs the same ``[storage.encryption]`` keyring), stops
cleanly on SIGINT/SIGTERM after the file in hand, and is resumed by running it again. Each run
that rewrote anything is audited as an operator action (PS3.15 A.5.3.1 Application Activity).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import structlog

from audit.builders import operator_action
from audit.events import Code
from conf.settings import Settings
from gateway.app import runtime_for
from gateway.cli_help import add_command, operator_name
from storage.encryption import StoredFileIntegrityError
from storage.filestore import FileStore
from storage.keyring import generate_key_file, load_keyring
from storage.rotation import RotationReport, rotate_store

log = structlog.get_logger(__name__)

#: A private code (PS3.16 §8.2: "99" designators are local): PS3.15 CID 401 has no event type for
#: "the stored files were re-encrypted under another key".
KEYS_ROTATED = Code("KEY-ROTATE", "99PNEUMO", "Operator re-encrypted the file store under the current key")


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    """Write a new random key file (mode 0600); refuses to overwrite."""
    path: Path = args.path
    try:
        generate_key_file(path)
    except FileExistsError:
        print(f"pneumo: {path} exists; not overwritten", file=sys.stderr)
        return 2
    print(json.dumps({"ok": True, "key_file": str(path)}))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Count stored files by the key they are under (read only; the database is not opened)."""
    args.dry_run = True
    return cmd_rotate(args, settings)


def cmd_rotate(args: argparse.Namespace, settings: Settings) -> int:
    """Rotate (or, with ``--dry-run``, count); see :mod:`storage.rotation`."""
    stop = threading.Event()
    previous = _stop_on_signals(stop)
    try:
        if args.dry_run:  # read only: no database, no audit record
            store = FileStore(settings.dicom_dir, settings.tmp_dir, keyring=load_keyring(settings.storage.encryption))
            try:
                report = rotate_store(store, dry_run=True, stop=stop, progress=_progress)
            finally:
                store.close()
        else:
            with runtime_for(settings, migrate=False) as runtime:
                try:
                    report = rotate_store(runtime.store, stop=stop, progress=_progress)
                except StoredFileIntegrityError as exc:
                    print(f"pneumo: {exc}", file=sys.stderr)
                    return 2
                if report.rotated or report.failed:
                    event = operator_action(
                        runtime.audit_source, operator=operator_name(), host=socket.gethostname(),
                        when=dt.datetime.now(dt.UTC), description="file store re-encrypted: " + _summary(report),
                    )
                    runtime.audit(dataclasses.replace(event, event_types=(KEYS_ROTATED,)))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(json.dumps({"ok": report.failed == 0, **report.as_dict()}))
    if report.failed:
        return 1
    return 3 if report.interrupted else 0


def _summary(report: RotationReport) -> str:
    return ", ".join(f"{k}={v}" for k, v in report.as_dict().items())[:500]


def _progress(report: RotationReport) -> None:
    log.info("storage.keys_rotate.progress", **{k: v for k, v in report.as_dict().items() if k != "current_key_id"})


def _stop_on_signals(stop: threading.Event) -> dict[int, Any]:
    def request_stop(signum: int, _frame: Any) -> None:
        log.info("storage.keys_rotate.stopping", signal=signal.Signals(signum).name)
        stop.set()

    return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}



def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys generate|status|rotate`` to the ``pneumo`` command parser's *subparsers*."""
    keys = add_command(
        subparsers, "keys", summary="encryption at rest: new key, status, re-encrypt the file store",
        description="Keys of the file store's encryption at rest ([storage.encryption], docs/configuration.md).",
        examples=["pneumo keys generate /run/secrets/pneumo-store-2026.key", "pneumo keys status", "pneumo keys rotate"],
    )
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    generate = add_command(
        actions, "generate", summary="write a new random AES-256 key file (mode 0600, never overwrites)",
        description="Write 32 random bytes as 64 hex digits to PATH, readable by its owner only.",
        examples=["pneumo keys generate /run/secrets/pneumo-store-2026.key"],
    )
    generate.add_argument("path", type=Path, metavar="PATH")
    generate.set_defaults(handler=cmd_generate)
    status = add_command(
        actions, "status", summary="count stored files by key id (read only)",
        description=(
            "Walk the file store and count files already under the current key and, by key id (or\n"
            "'plaintext'), those `pneumo keys rotate` would rewrite. Prints one JSON object."
        ),
        examples=["pneumo keys status"],
    )
    status.set_defaults(handler=cmd_status, dry_run=True)
    rotate = add_command(
        actions, "rotate", summary="re-encrypt every stored file under the current key (resumable; audited)",
        description=(
            "Rewrite every stored file that is plaintext or under a retired key, one file at a time, each\n"
            "atomically under its SOP Instance UID lock. Safe while `pneumo serve` runs (give serve the new\n"
            "key as current and the old as retired first), safe to stop (Ctrl-C/SIGTERM: exit 3) and\n"
            "resumed by running it again. Prints one JSON object; exit 1 if a file failed authentication\n"
            "(left untouched). Audited as an operator action."
        ),
        examples=["pneumo keys rotate", "pneumo keys rotate --dry-run", "nice ionice -c3 pneumo keys rotate"],
    )
    rotate.add_argument("--dry-run", action="store_true", help="count what would be rewritten; change nothing")
    rotate.set_defaults(handler=cmd_rotate)
