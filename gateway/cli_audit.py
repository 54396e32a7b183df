"""``pneumo audit export``: the thin CLI over :mod:`audit.export` (docs/audit.md, "Audit export")."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import sys
from pathlib import Path
from typing import IO

import structlog

from audit.anchor import load_signer
from audit.events import AuditSource, Outcome
from audit.export import FORMATS, ExportFormat, audit_log_used, export
from audit.store import append, signer_session_info
from conf.settings import Settings
from fhir_api.audit_event_search import PatientReferences
from gateway.cli_db import existing_store
from gateway.cli_help import add_command, operator_name

log = structlog.get_logger(__name__)

EXPORT_DESCRIPTION = """\
Write the audit records sealed in [--since, --until) to --output (default: standard output):

  dicom  DICOM PS3.15 A.5.1 AuditMessage XML, one per record, inside one <AuditMessages> element
  fhir   FHIR R4 AuditEvent resources (IHE BALP shape), NDJSON: one resource per line (FHIR Bulk Data)
  jsonl  the stored records with seq, recorded_at, hash, prev_hash and hash_version, one per line:
         enough to re-verify the hash chain offline (with the HMAC key for keyed records)

Dates are ISO 8601 (2026-11-01, 2026-11-01T08:00:00+01:00); without a zone they are UTC. The export
is itself audited (Audit Log Used, PS3.15 A.5.3.3). With --output, the file is written next to its
final name and renamed when complete, and a summary {ok, records, format, output} goes to stdout
(without --output the log line "audit.exported" says how many records were written). Reads the
existing store only (exit 2 when there is none)."""


def parse_when(text: str) -> dt.datetime:
    """An ISO 8601 date or date-time for --since/--until; naive values are UTC."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or date-time: {text!r}") from exc
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)



def cmd_audit_export(args: argparse.Namespace, settings: Settings) -> int:
    fmt: ExportFormat = args.format
    since: dt.datetime = args.since
    until: dt.datetime = args.until or dt.datetime.now(dt.UTC)  # records appended meanwhile wait for the next export
    if until <= since:
        print("pneumo: --until must be after --since", file=sys.stderr)
        return 2
    output: Path | None = args.output
    # The Audit Log Used record is sealed like every other.
    signer = load_signer(settings.audit.hmac_key_file, settings.audit.retired_hmac_key_files)
    host = socket.gethostname()
    with existing_store(settings, args.config, session_info=signer_session_info(signer)) as database:
        partial = None if output is None else output.with_name(output.name + ".part")
        stream: IO[bytes] = sys.stdout.buffer if partial is None else partial.open("wb")
        try:
            with database.read_session() as session:
                count = export(session, stream, since=since, until=until, fmt=fmt,
                               patient_reference=PatientReferences(session) if fmt == "fhir" else None)
            stream.flush()
            if partial is not None and output is not None:
                os.fsync(stream.fileno())
                stream.close()
                partial.replace(output)
        finally:
            if partial is not None:
                stream.close()
                partial.unlink(missing_ok=True)
        span = f"since {since.isoformat()} until {until.isoformat()}"
        event = audit_log_used(
            AuditSource(source_id=f"{settings.dicom.ae_title}@{host}"), user=operator_name() or "unknown", host=host,
            when=dt.datetime.now(dt.UTC), description=f"pneumo audit export --format {fmt}: {count} records {span}",
            query=span, outcome=Outcome.SUCCESS,
        )
        with database.session() as session:
            append(session, event)
    if output is not None:
        print(json.dumps({"ok": True, "records": count, "format": fmt, "output": str(output)}))
    log.info("audit.exported", records=count, format=fmt, to_file=output is not None)  # stdout holds the export
    return 0


def register(audit_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``export`` to the ``pneumo audit`` subcommands."""
    parser = add_command(
        audit_commands, "export", summary="export the audit log as DICOM XML, FHIR AuditEvent or JSON lines",
        description=EXPORT_DESCRIPTION,
        examples=[
            "pneumo audit export --since 2026-11-01 --format dicom --output audit-2026-11.xml",
            "pneumo audit export --since 2026-11-01 --until 2026-12-01 --format fhir > auditevents.ndjson",
            "pneumo audit export --since 2026-01-01 --format jsonl --output audit.jsonl",
        ],
    )
    parser.add_argument("--since", type=parse_when, required=True, help="first instant (inclusive), ISO 8601")
    parser.add_argument("--until", type=parse_when, default=None, help="end (exclusive), ISO 8601; default: now")
    parser.add_argument("--format", choices=FORMATS, required=True, help="dicom, fhir or jsonl")
    parser.add_argument("--output", type=Path, default=None, help="file to write (default: standard output)")
    parser.set_defaults(handler=cmd_audit_export)
