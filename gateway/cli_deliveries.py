"""``pneumo deliveries``: the operator's view of the outbox, every channel (docs/delivery.md).

``list`` shows deliveries (optionally one state or channel), ``show`` one with every attempt,
and ``retry`` puts dead-lettered deliveries (state ``failed``) back in the queue — by id or all
of them — and audits who did it. The queries live in :mod:`storage.outbox`; this is the CLI.
"""

from __future__ import annotations

import argparse
import json
import socket

from conf.settings import Settings
from gateway.app import runtime_for
from gateway.cli_db import existing_store, require_store
from gateway.cli_help import add_command, operator_name
from storage.models import JobState
from storage.outbox import Channel, list_deliveries, retry_deliveries, show_delivery
from storage.wakeup import DELIVER, WakeSender


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    with existing_store(settings, args.config) as database, database.read_session() as session:
        rows = list_deliveries(session, args.state, args.channel)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'id':>6} {'state':<8} {'tries':>5} {'channel':<8} {'destination':<16} {'subject':<64} last error")
    for row in rows:
        error = (row["last_error"] or "").splitlines()[0][:60] if row["last_error"] else "-"
        print(
            f"{row['id']:>6} {row['state']:<8} {row['attempts']:>5} {str(row['channel'])[:8]:<8} "
            f"{str(row['destination'])[:16]:<16} {row['subject'] or '-':<64} {error}"
        )
    print(f"{len(rows)} deliver{'y' if len(rows) == 1 else 'ies'}")
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    with existing_store(settings, args.config) as database, database.read_session() as session:
        detail = show_delivery(session, args.job_id)
    if detail is None:
        print(json.dumps({"error": f"no delivery job {args.job_id}"}))
        return 1
    print(json.dumps(detail, indent=2))
    return 0



def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    if bool(args.job_ids) == bool(args.all_failed):
        print(json.dumps({"error": "give JOB_ID... or --all-failed (not both)"}))
        return 2
    wanted: list[int] | None = None if args.all_failed else list(args.job_ids)
    require_store(settings, args.config)
    with runtime_for(settings) as runtime, runtime.database.session() as session:
        retried = retry_deliveries(
            session, wanted, audit_source=runtime.audit_source, operator=operator_name(), host=socket.gethostname()
        )
    if retried:  # committed: a running gateway's delivery workers start on them now, not at their next poll
        sender = WakeSender(settings.wake_dir)
        sender.notify(DELIVER)
        sender.close()
    skipped = sorted(set(wanted or ()) - set(retried))
    print(json.dumps({"retried": retried, "skipped": skipped}))
    return 1 if skipped else 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``deliveries list|show|retry`` to the ``pneumo`` command parser's *subparsers*."""
    deliveries = add_command(
        subparsers, "deliveries", summary="the outbox: list, inspect and retry deliveries (all channels)",
        description=(
            "The outbox of every channel (dicom, hl7, fhir-subscription): what was sent where, every\n"
            "attempt and the peer's answer, and operator retries of dead-lettered deliveries."
        ),
        examples=["pneumo deliveries list --state failed", "pneumo deliveries show 42", "pneumo deliveries retry --all-failed"],
    )
    actions = deliveries.add_subparsers(dest="deliveries_command", required=True, metavar="ACTION")

    listing = add_command(
        actions, "list", summary="list deliveries",
        description=(
            "One line per delivery: id, state (pending, running, done, failed = dead-lettered), attempts,\n"
            "channel, destination, subject (a SOP Instance UID on the dicom channel) and the last error.\n"
            "Reads the existing store only (exit 2 when there is none)."
        ),
        examples=["pneumo deliveries list", "pneumo deliveries list --channel dicom --state failed --json"],
    )
    listing.add_argument("--state", choices=[s.value for s in JobState], default=None, help="only deliveries in this state")
    listing.add_argument("--channel", choices=[c.value for c in Channel], default=None, help="only this channel")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=cmd_list)

    show = add_command(
        actions, "show", summary="one delivery with all its attempts (JSON)",
        description="One delivery job and every attempt at it (when, outcome, what the peer answered), as JSON.",
        examples=["pneumo deliveries show 42"],
    )
    show.add_argument("job_id", type=int, metavar="JOB_ID", help="the id `pneumo deliveries list` shows")
    show.set_defaults(handler=cmd_show)

    retry = add_command(
        actions, "retry", summary="put dead-lettered deliveries back in the queue (audited)",
        description=(
            "Put dead-lettered deliveries (state failed) back in the queue, by id or all of them; audited\n"
            "with the operator's user and host. Prints {retried, skipped}; exit 1 when some were skipped."
        ),
        examples=["pneumo deliveries retry 42 43", "pneumo deliveries retry --all-failed"],
    )
    retry.add_argument("job_ids", type=int, nargs="*", metavar="JOB_ID", help="delivery ids (state failed)")
    retry.add_argument("--all-failed", action="store_true", help="every dead-lettered delivery")
    retry.set_defaults(handler=cmd_retry)
