"""``pneumo status``: is the gateway keeping up, and is anything stuck? (docs/operations.md).

Thin: the queries are :mod:`storage.status`; this module adds what only the composition root
may read (the model package, :mod:`inference.manifest`) and prints. Read-only; never creates or
migrates a store. Exit 0 healthy, 1 when something needs an operator (dead letters, a destination
failing longer than ``--failing-minutes``, a schema older than this version, a model package that
would be refused, a database bound to another file store, model drift above
``monitoring.drift_psi_alert``), 2 when there is no store.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from dataclasses import asdict
from typing import Any

from conf.settings import Settings
from gateway.cli_db import existing_store
from gateway.cli_help import add_command
from inference.drift import DriftReport, model_drift
from inference.errors import ModelPackageError
from inference.manifest import BUNDLED_MODEL_DIR, ModelManifest, load_manifest
from storage.db import Database
from storage.integrity import StoreIntegrityError, read_database_identity, read_marker
from storage.migrate import current_revision, head_revision
from storage.models import utcnow
from storage.status import dead_letters, destination_health, models_in_results, problems, queue_depths

#: Default of ``--failing-minutes``: the outbox retries a peer that is down for about half an hour
#: before dead-lettering (storage/jobs.py backoff_delay); an outage of 15 minutes is worth a look.
DEFAULT_FAILING_MINUTES = 15.0


def _iso(value: Any) -> Any:
    """Datetimes as ISO 8601 (UTC), recursively; everything else as is."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _iso(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_iso(v) for v in value]
    return value


def model_status(settings: Settings) -> dict[str, Any]:
    """The model package this configuration loads (its SHA-256 verified, as ``serve`` does)."""
    return _model(settings)[0]


def _model(settings: Settings) -> tuple[dict[str, Any], ModelManifest | None]:
    model_dir = settings.inference.model_dir or BUNDLED_MODEL_DIR
    try:
        manifest = load_manifest(model_dir)
    except ModelPackageError as exc:
        return {"ok": False, "model_dir": str(model_dir), "error": str(exc)}, None
    return {"ok": True, "model_dir": str(model_dir), "id": manifest.id, "name": manifest.name,
            "version": manifest.version, "device_uid": manifest.device_uid}, manifest


def drift_problem(drift: DriftReport) -> str | None:
    """The problem line of a drift alert (docs/operations.md, "Model drift"), else None."""
    if not drift.alert:
        return None
    shifted = ", ".join(f"{f.feature} {f.psi:.2f}" for f in drift.features if f.alert and f.psi is not None)
    return (f"model drift: PSI above {drift.psi_alert:g} ({shifted}) over the last {drift.samples} results of "
            f"{drift.model_id} {drift.version}: inputs or outputs no longer look like the validation data")


def store_status(settings: Settings, database: Database) -> dict[str, Any]:
    """Which database and file store, whether they belong together, and the schema revision."""
    current, head = current_revision(database), head_revision(database)
    held = read_database_identity(database)
    try:
        marker: str | None = read_marker(settings.dicom_dir)
        marker_error = None
    except StoreIntegrityError as exc:
        marker, marker_error = None, str(exc)
    return {
        "database": database.display_url,
        "backend": database.url.get_backend_name(),
        "schema_revision": current,
        "schema_head": head,
        "schema_current": current == head,
        "file_store": str(settings.dicom_dir.resolve()),
        "database_store_id": held,
        "file_store_id": marker,
        "bound": held is not None and held == marker,
        **({"file_store_error": marker_error} if marker_error else {}),
    }


def collect(settings: Settings, database: Database, now: dt.datetime, failing_minutes: float) -> dict[str, Any]:
    """The whole report (what ``--json`` prints), with ``healthy`` and the ``problems`` behind it."""
    store = store_status(settings, database)
    model, manifest = _model(settings)
    report: dict[str, Any] = {"checked_at": now, "store": store, "model": model}
    found: list[str] = []
    if not store["schema_current"]:
        found.append(f"database schema at {store['schema_revision']}, this version needs {store['schema_head']}: "
                     "run `pneumo db upgrade` as the schema owner")
    else:
        with database.read_session() as session:
            queues = queue_depths(session, now)
            dead = dead_letters(session)
            destinations = destination_health(session)
            model["in_results"] = models_in_results(session)
        report["queues"] = [{**asdict(q), "oldest_due_age_seconds": q.oldest_due_age_seconds(now)} for q in queues]
        report["dead_letters"] = asdict(dead)
        report["destinations"] = [{**asdict(d), "failing_for_seconds": d.failing_for_seconds(now)} for d in destinations]
        found += problems(dead, destinations, now, dt.timedelta(minutes=failing_minutes))
        if manifest is not None:
            drift = model_drift(database, manifest, settings.monitoring)
            report["drift"] = drift.to_json()
            found += [p for p in (drift_problem(drift),) if p]
    if not model["ok"]:
        found.append(f"model package refused: {model['error']}")
    if store.get("file_store_error"):
        found.append(store["file_store_error"])
    elif store["database_store_id"] and store["file_store_id"] and not store["bound"]:
        found.append("the database indexes another file store (store ids differ): `pneumo db check` says more")
    report["healthy"] = not found
    report["problems"] = found
    return _iso(report)  # type: ignore[no-any-return]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render(report: dict[str, Any]) -> str:
    """The human-readable form: store, model, queues, destinations, verdict."""
    store, model = report["store"], report["model"]
    lines = [
        f"database    {store['database']} (schema {store['schema_revision']}"
        + ("" if store["schema_current"] else f", needs {store['schema_head']}") + ")",
        f"file store  {store['file_store']} (store id {store['file_store_id'] or '-'}"
        + (", bound to the database" if store["bound"] else ", NOT bound to the database") + ")",
        f"model       {model['name']} {model['version']} ({model['id']})" if model["ok"]
        else f"model       REFUSED: {model['error']}",
    ]
    if "queues" in report:
        lines += ["", f"{'job kind':<16} {'queued':>7} {'due':>6} {'running':>8} {'dead':>6} {'oldest due':>11}"]
        lines += [f"{q['kind']:<16} {q['queued']:>7} {q['due']:>6} {q['running']:>8} {q['dead_letter']:>6} "
                  f"{_age(q['oldest_due_age_seconds']):>11}" for q in report["queues"]] or ["(queue empty)"]
        lines += ["", f"{'channel':<18} {'destination':<18} {'last success':<26} {'last failure':<26} "
                  f"{'class':<15} {'streak':>6} {'pending':>7} {'dead':>5}"]
        lines += [
            f"{d['channel']:<18} {d['destination']:<18} {d['last_success_at'] or '-':<26} {d['last_failure_at'] or '-':<26} "
            f"{_failure_text(d):<15} {d['failing_streak']:>6} {d['pending']:>7} {d['dead_letter']:>5}"
            for d in report["destinations"]
        ] or ["(no deliveries yet)"]
        if "drift" in report:
            lines += ["", *_drift_lines(report["drift"])]
        dead = report["dead_letters"]
        if dead["total"]:
            more = ", ..." if len(dead["ids"]) < dead["total"] else ""
            lines += ["", f"dead letters: {dead['total']} (ids {', '.join(map(str, dead['ids']))}{more}); "
                      "`pneumo deliveries retry` re-queues deliveries"]
    lines += ["", "healthy" if report["healthy"] else "UNHEALTHY:"]
    lines += [f"  - {problem}" for problem in report["problems"]]
    return "\n".join(lines)


def _drift_lines(drift: dict[str, Any]) -> list[str]:
    head = f"drift       {drift['model_id']} {drift['version']}: "
    if drift["state"] == "no reference":
        return [head + "no reference in the model package (not monitored)"]
    window = f"{drift['samples']} result(s) of window {drift['window']}"
    if drift["state"] == "too few samples":
        return [head + f"too few samples ({window}; a verdict needs {drift['min_samples']})"]
    verdict = "ALERT" if drift["alert"] else "stable"
    lines = [head + f"{verdict} over {window} (PSI alert above {drift['psi_alert']:g})"]
    lines += [f"  {f['feature']:<16} PSI " + ("-" if f["psi"] is None else f"{f['psi']:.3f}") + ("  ALERT" if f["alert"] else "")
              for f in drift["features"]]
    return lines


def _failure_text(destination: dict[str, Any]) -> str:
    if destination["last_failure_class"] is None:
        return "-"
    status = destination["last_peer_status"]
    return str(destination["last_failure_class"]) + (f" {status}" if status else "")


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    with existing_store(settings, args.config, require_current=False) as database:
        report = collect(settings, database, utcnow(), args.failing_minutes)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["healthy"] else 1


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = add_command(
        commands, "status", summary="queue depths, dead letters, delivery health, model, store (exit 1: needs attention)",
        description=(
            "What the gateway is doing and whether anything needs an operator, from the database:\n"
            "  queue      jobs per kind: queued, due now, running, dead-lettered, age of the oldest due job\n"
            "  delivery   per channel (dicom, hl7, fhir-subscription) and destination: last success, last\n"
            "             failure and its class (no-answer, refused + the peer's status, not-configured),\n"
            "             failures since the last success, deliveries pending, dead letters\n"
            "  model      the model package this configuration loads (SHA-256 verified), and the model\n"
            "             versions that made the stored results\n"
            "  drift      population stability index (PSI) of the newest results' probabilities and input\n"
            "             statistics against the model package's reference ([monitoring] drift_window)\n"
            "  store      the database (password hidden), schema revision, file store and their store ids\n"
            "No patient, study or instance is named: counts, kinds, destinations, times, error classes.\n"
            "Exit 0 healthy; 1 when there are dead letters, a destination has failed for longer than\n"
            "--failing-minutes, the schema is older than this version, the model package would be\n"
            "refused, the database indexes another file store or a drift PSI is above\n"
            "monitoring.drift_psi_alert; 2 when there is no store."
        ),
        examples=["pneumo status", "pneumo status --json --failing-minutes 30"],
    )
    status.add_argument("--json", action="store_true", help="one JSON object (every field; times ISO 8601 UTC)")
    status.add_argument("--failing-minutes", type=float, default=DEFAULT_FAILING_MINUTES, metavar="N",
                        help=f"a destination failing for longer than N minutes makes the exit status 1 "
                             f"(default {DEFAULT_FAILING_MINUTES:g})")
    status.set_defaults(handler=cmd_status)
