"""Metrics benchmark: what one Prometheus scrape of ``/metrics`` costs the database projection
(:class:`storage.metrics.DatabaseCollector`) after a burst.

For each backend (SQLite file, PostgreSQL when reachable): a fresh schema, a collector started on
it, then ``--rows`` new instances, image results (with stage timings), delivery attempts and audit
records written in bulk — what a busy hour leaves between two scrapes. Then scrapes
(``generate_latest`` of the registry, as ``/metrics`` does) until the tails have caught up,
timing each, and one more on a quiet database. Reported: seconds per scrape with a full batch
(``--max-rows`` rows per table), scrapes and seconds to catch up, seconds of a quiet scrape, and
one scrape that reads the whole burst at once (``max_rows = rows``).

Not a test. Run: ``python bench/metrics.py --rows 10000``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine, insert, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from audit.builders import security_alert  # noqa: E402
from audit.events import AuditSource, EventType  # noqa: E402
from audit.store import append_many  # noqa: E402
from bench.report import emit  # noqa: E402
from storage import jobs  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.job_kinds import DELIVER_JOB  # noqa: E402
from storage.metrics import DatabaseCollector  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.models import DeliveryAttempt, InferenceResult, Instance, Patient, Series, Study  # noqa: E402

POSTGRES_URL = os.environ.get("PNEUMO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
TIMINGS = {"read": 4.1, "decode": 21.7, "preprocess": 6.3, "infer": 83.0, "total": 115.2}
REASONS = ["modality MR is not one of CR, DX", "patient age unknown: neither ...", "image too small: 100x100 pixels"]


def fill(database: Database, rows: int) -> float:
    """Write *rows* of each tailed table (in bulk; the audit records through the real hash chain)."""
    started = time.perf_counter()
    with database.session() as session:
        patient = Patient(patient_id="BENCH", issuer="", name="BENCH^PATIENT")
        session.add(patient)
        session.flush()
        study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}", patient_pk=patient.id)
        session.add(study)
        session.flush()
        series = Series(series_instance_uid=f"2.25.{uuid.uuid4().int}", study_pk=study.id, modality="CR")
        session.add(series)
        jobs.enqueue(session, DELIVER_JOB, f"bench:{uuid.uuid4().hex}", payload={"channel": "dicom", "destination": "PACS"})
        session.flush()
        job_pk = session.execute(text("SELECT max(id) FROM job")).scalar_one()
        first = (session.execute(text("SELECT coalesce(max(id), 0) FROM instance")).scalar_one()) + 1
        session.execute(insert(Instance), [
            {"id": first + n, "sop_instance_uid": f"2.25.{uuid.uuid4().int}", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
             "series_pk": series.id, "transfer_syntax_uid": "1.2.840.10008.1.2.1", "path": f"x/{n}", "size": 7_000_000,
             "sha256": "0" * 64, "origin": "received" if n % 4 else "generated", "received_at": NOW, "updated_at": NOW}
            for n in range(rows)
        ])
        results: list[dict[str, Any]] = []
        for n in range(rows):
            row: dict[str, Any] = {"instance_pk": first + n, "model_id": "m", "model_version": "1", "created_at": NOW}
            if n % 10:
                row.update(status="ok", label="PNEUMONIA" if n % 3 else "NORMAL", probability=0.7, timings_ms=TIMINGS)
            else:
                row.update(status="not-applicable", reason=REASONS[n % 3], timings_ms={"read": 3.0, "total": 3.5})
            results.append(row)
        session.execute(insert(InferenceResult), results)
        session.execute(insert(DeliveryAttempt), [
            {"job_pk": job_pk, "attempt": 1, "channel": "dicom" if n % 2 else "hl7", "destination": "PACS" if n % 2 else "EHR",
             "subject": f"s{n}", "started_at": NOW, "finished_at": NOW + dt.timedelta(milliseconds=40 + n % 200),
             "outcome": "delivered" if n % 7 else "failed", "peer_status": None if n % 7 else "0xA700",
             "error": None if n % 7 else "refused"}
            for n in range(rows)
        ])
    source = AuditSource("BENCH")
    events = [security_alert(source, event_type=EventType.NODE_AUTHENTICATION, reporter_ae="PNEUMO",
                             offender_id="X", offender_host="10.0.0.1", description="bench", when=NOW)
              for _ in range(rows)]
    for start in range(0, rows, 1000):
        with database.session() as session:
            append_many(session, events[start:start + 1000])
    return time.perf_counter() - started


def scrape_times(database: Database, rows: int, max_rows: int) -> dict[str, Any]:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(database, destinations={"dicom": ["PACS"], "hl7": ["EHR"]}, max_rows=max_rows))
    whole = CollectorRegistry()
    whole.register(DatabaseCollector(database, destinations={"dicom": ["PACS"], "hl7": ["EHR"]}, max_rows=rows))
    fill_seconds = fill(database, rows)
    times = []
    while True:
        started = time.perf_counter()
        exposition = generate_latest(registry).decode()
        times.append(time.perf_counter() - started)
        if 'pneumo_metrics_batch_full{table="audit_record"} 0.0' in exposition and \
                'pneumo_metrics_batch_full{table="inference_result"} 0.0' in exposition:
            break
    started = time.perf_counter()
    generate_latest(registry)
    quiet = time.perf_counter() - started
    started = time.perf_counter()
    generate_latest(whole)
    at_once = time.perf_counter() - started
    return {
        "rows_per_table": rows, "max_rows": max_rows, "fill_seconds": round(fill_seconds, 2),
        "scrapes_to_catch_up": len(times), "seconds_per_scrape": [round(t, 4) for t in times],
        "seconds_to_catch_up": round(sum(times), 3), "quiet_scrape_seconds": round(quiet, 4),
        "one_scrape_all_rows_seconds": round(at_once, 3), "exposition_bytes": len(exposition),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="new rows per table between two scrapes")
    parser.add_argument("--max-rows", type=int, default=5000, help="[metrics] max_rows_per_scrape")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    document: dict[str, Any] = {"benchmark": "metrics", "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        database = Database(f"sqlite:///{tmp}/bench.db", sqlite_synchronous="NORMAL")
        upgrade(database)
        document["backends"]["sqlite"] = scrape_times(database, args.rows, args.max_rows)
        database.dispose()
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001 - PostgreSQL is optional here
        document["backends"]["postgresql"] = f"skipped: {exc.__class__.__name__}"
    else:
        try:
            database = Database(f"{POSTGRES_URL}?options=-csearch_path%3D{schema}")
            upgrade(database)
            document["backends"]["postgresql"] = scrape_times(database, args.rows, args.max_rows)
            database.dispose()
        finally:
            with admin.begin() as connection:
                connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()
    emit(document, args.json)


if __name__ == "__main__":
    main()
