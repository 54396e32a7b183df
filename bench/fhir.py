"""FHIR API benchmark: reads and searches over 100k DiagnosticReports in PostgreSQL, with a floor.

What it measures, each at 1 and 16 concurrent clients (closed loop: a client sends its next request
when the previous answer arrived), requests/s, p50 and p99 latency and non-200 answers:

* ``read``     — ``GET /fhir/DiagnosticReport/<id>`` (random seeded ids);
* ``patient``  — ``GET /fhir/DiagnosticReport?patient=<id>`` (random seeded patients, ~10 reports each);
* ``date``     — ``GET /fhir/DiagnosticReport?date=ge<day>&_include=DiagnosticReport:result``
  (random days of the seeded range, ``_count`` the default 20: a page of 20 reports, their 20
  Observations, and the total — on average half the reports match);
* ``floor``    — a bare FastAPI ``def`` route returning one pre-serialised row from the same
  PostgreSQL through the same :class:`storage.db.Database`: no auth, no audit, no FHIR. It is what
  one uvicorn worker with this stack can do at best, so the API is judged against it, not only
  against an absolute number.

The API is assembled as ``pneumo serve`` assembles it (:func:`gateway.http.build_app`,
:func:`fhir_api.api.install`, :class:`gateway.http.HttpServer`): JWT auth against a JWK Set file
(RS256 tokens from :class:`tests.fhir_api.tokens.TokenService`; a few distinct tokens, which the
verifier caches), and an :class:`~fhir_api.audit_trail.AuditTrail` that is *started* (batched
audit, HMAC-sealed, as in production). API and floor run in their own processes, with the same
uvicorn settings (one worker), so that neither shares a GIL with the other or with the load.

The load generator is ``wrk`` (``apt-get install wrk``): C, one thread, keep-alive HTTP/1.1, a Lua
script that picks a random pre-formatted request per call. A Python client would spend as much CPU
per request as the server on this 2-core machine and measure itself. Each run is a warm-up (2 s,
discarded) then the measurement (10 s; longer, up to ``--max-seconds``, when it got fewer than
``--min-requests`` answers, so that a slow search still has a p99 worth the name). Between runs
the bench waits until the server and PostgreSQL are idle: a ``def`` route is not cancelled when
its client leaves, so a finished run's requests would otherwise delay the next one.

CPU during each measurement comes from ``/proc``: the server process, every PostgreSQL process
(the postmaster's exited children included: a connection opened and closed within the run), wrk,
and the rest of the machine ("other"). The machine is shared (test suites, other benchmarks), so
each run starts on an idle machine and is measured again (``--tries``) when others used more than
0.15 cores meanwhile; the JSON says which runs never got a quiet machine. PostgreSQL connections
opened during a run (``pg_stat_database.sessions``) show a pool that reconnects under load.

Seeding (``--seed``) fills a dedicated schema (``bench_fhir``) migrated with
:func:`storage.migrate.upgrade`: N studies of one chest radiograph each, ~10 per patient, study
dates spread evenly over two years (studies arrive in date order, so ``fhir_resource.id`` grows
with the date, as in production), each with its ImagingStudy, Observation and final
DiagnosticReport, plus one shared Device. The resources are what :mod:`fhir_api.resources` makes
from :mod:`fhir_api.facts`: ~100 templates come from the mappers (probabilities vary), each study's
identity (UIDs, accession, patient, observation id, dates) is substituted into a template's JSON,
and a sample of studies is checked to be exactly what the mappers make of its facts. Rows go in
with ``COPY`` (``fhir_resource``, ``fhir_resource_version``, ``fhir_search_index``), 1000 studies
per transaction, then ``VACUUM ANALYZE``; a sample is first written with
:func:`fhir_api.store.put` (rolled back) and compared column for column, so the fast path writes
what ``store.put`` writes. Seeding is idempotent: the schema records a fingerprint of the tables
(as the models declare them) and of a sample's rows; the same fingerprint skips the seeding, a
different one (the models, mappers, serialisation or index extraction changed) seeds again, and
measuring refuses a schema seeded by other code.

Every run also records ``EXPLAIN (ANALYZE, BUFFERS)`` of the statements the API runs for one
patient search and one date search (captured from :func:`fhir_api.search.run` itself, not
rewritten) in the JSON; ``--explain`` prints them. The JSON names the commit and the uncommitted
changes of the code under test.

Not a test. Run: ``python bench/fhir.py --seed`` (seeds 100k on first use, ~3 min, then measures).
Needs PostgreSQL (``--url``, default the test database) and ``wrk``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder would come first on the path and this module would shadow the
# `fhir` package (fhir.resources, which the mappers use): the repository root goes there instead.
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]

from sqlalchemy import event, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from bench.ingest import free_port, wait_for_port  # noqa: E402
from fhir_api import ids, resources  # noqa: E402
from fhir_api.facts import (  # noqa: E402
    ImageFinding,
    InstanceFacts,
    ModelFacts,
    PatientFacts,
    ReportFacts,
    ReportStatus,
    SeriesFacts,
    StudyFacts,
)
from fhir_api.search_params import date_range, extract_index  # noqa: E402
from fhir_api.store import _served, content_digest  # noqa: E402
from storage.db import Database  # noqa: E402

POSTGRES_URL = os.environ.get("PNEUMO_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SCHEMA = "bench_fhir"
RESULTS = ROOT / "bench" / "results" / "fhir.json"

UID_ROOT = "1.2.826.0.1.3680043.8.498.4242"  # pydicom's root + a branch of our own
ISSUER = "1.2.826.0.1.3680043.8.498.4242.1"  # Issuer of Patient ID: an OID, so Identifier.system is urn:oid:
FIRST_DAY = dt.date(2024, 12, 1)
DAYS = 730
CR = "1.2.840.10008.5.1.4.1.1.1"
SR = "1.2.840.10008.5.1.4.1.1.88.22"
SC = "1.2.840.10008.5.1.4.1.1.7"
MODEL = ModelFacts(
    model_id="pneumo-effnet", name="Pneumo EfficientNet-B0", version="1.0.0", manufacturer="Pneumo Gateway",
    device_uid="1.2.826.0.1.3680043.8.498.77", intended_use="Adult frontal chest radiographs (PA/AP), age 18 and over",
    threshold=0.5,
)
TEMPLATES = 100
SCENARIOS = ("floor", "read", "patient", "date")
OTHER_CPU_LIMIT = 0.15  # cores used by processes outside the benchmark during a run: above it the run is measured again

# -- the corpus: every study's facts are a function of its number -------------------------------

_FAMILY = ("Doe", "Smith", "Müller", "García", "Nguyen", "Kowalski", "O'Brien", "Rossi", "Dubois", "Jensen")
_GIVEN = ("Jane", "John", "Ana", "Lukas", "Mei", "Olga", "Pierre", "Sofia", "Tom", "Zoë")


def patient_facts(number: int) -> PatientFacts:
    rng = random.Random(number)
    return PatientFacts(
        patient_id=f"PAT{number:07d}", issuer=ISSUER,
        name=f"{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}", birth_date=f"{rng.randint(1930, 2005)}{rng.randint(1, 12):02d}"
        f"{rng.randint(1, 28):02d}", sex=rng.choice("MFMFO"),
    )


def study_patients(reports: int) -> list[int]:
    """The patient of each study: ~10 studies each, in a shuffled (but reproducible) order of arrival."""
    patients = max(1, reports // 10)
    order = [n % patients for n in range(reports)]
    random.Random(4242).shuffle(order)
    return order


def study_day(number: int, reports: int) -> dt.date:
    """Studies arrive in date order, evenly over :data:`DAYS` days (~137 a day for 100k)."""
    return FIRST_DAY + dt.timedelta(days=number * DAYS // reports)


def study_uid(number: int) -> str:
    return f"{UID_ROOT}.{number + 1}"


def _study_facts(uid: str, patient: PatientFacts, accession: str, day: str) -> StudyFacts:
    return StudyFacts(
        study_instance_uid=uid, patient=patient, accession_number=accession, study_date=day, study_time="081500",
        description="XR CHEST PA", series=(
            SeriesFacts(f"{uid}.1", "CR", 1, "CHEST", "CHEST PA", (InstanceFacts(f"{uid}.1.1", CR, 1),)),
            SeriesFacts(f"{uid}.9901", "SR", 9901, None, "AI pneumonia result (SR)", (InstanceFacts(f"{uid}.9901.1", SR, 1),)),
            SeriesFacts(f"{uid}.9902", "OT", 9902, None, "AI pneumonia summary (SC)", (InstanceFacts(f"{uid}.9902.1", SC, 1),)),
        ),
    )


def _variant_probability(variant: int) -> float:
    return round(0.005 + 0.99 * variant / (TEMPLATES - 1), 3)


def facts(uid: str, patient: PatientFacts, accession: str, day: dt.date, analysed: dt.datetime, issued: dt.datetime,
          variant: int) -> tuple[StudyFacts, ImageFinding, ReportFacts]:
    """One final study as the projection reads it: one CR image analysed, its SR and summary image."""
    study = _study_facts(uid, patient, accession, day.strftime("%Y%m%d"))
    probability = _variant_probability(variant)
    label = "PNEUMONIA" if probability >= MODEL.threshold else "NORMAL"
    finding = ImageFinding(f"{uid}.1.1", f"{uid}.1", probability, label, MODEL.threshold, MODEL, analysed, f"{uid}.9901.1")
    report = ReportFacts(study, ReportStatus.FINAL, issued, images=1, analysed=1, label=label, probability=probability,
                         threshold=MODEL.threshold, model=MODEL, findings=(finding,), result_version=1,
                         sr_sop_instance_uids=(f"{uid}.9901.1",))
    return study, finding, report


def mapped(study: StudyFacts, finding: ImageFinding, report: ReportFacts) -> list[dict[str, Any]]:
    """The study's own resources, by the real mappers, in the projection's order."""
    return [resources.imaging_study(study), resources.observation(finding, study), resources.diagnostic_report(report)]


def _instant(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class StudyIdentity:
    """What differs between two studies made from the same template."""

    number: int
    uid: str
    accession: str
    patient: PatientFacts
    day: dt.date
    analysed: dt.datetime
    issued: dt.datetime
    variant: int

    @classmethod
    def of(cls, number: int, patient: PatientFacts, reports: int) -> StudyIdentity:
        day = study_day(number, reports)
        analysed = dt.datetime(day.year, day.month, day.day, 8, 15, tzinfo=dt.UTC) + dt.timedelta(seconds=(number * 37) % 36000)
        return cls(number, study_uid(number), f"ACC{number + 1:08d}", patient, day, analysed,
                   analysed + dt.timedelta(seconds=95), (number * 7919) % TEMPLATES)

    def facts(self) -> tuple[StudyFacts, ImageFinding, ReportFacts]:
        return facts(self.uid, self.patient, self.accession, self.day, self.analysed, self.issued, self.variant)


class Templates:
    """Mapper output for placeholder identities, one per probability variant, as JSON text.

    Every identity value reaches the resources verbatim (UIDs, accession, dates) or through
    :mod:`fhir_api.ids` (patient and observation ids), so replacing the placeholders in the text
    gives what the mappers make of the real facts; :meth:`check` proves it on a sample.
    """

    _UID = "2.25.987654321"
    _ACCESSION = "ACCPLACEHOLDER"
    _DAY = dt.date(1900, 1, 1)
    _ANALYSED = dt.datetime(1900, 1, 2, 8, 0, tzinfo=dt.UTC)
    _ISSUED = dt.datetime(1900, 1, 2, 8, 5, tzinfo=dt.UTC)
    _PATIENT = PatientFacts("PLACEHOLDER", ISSUER)

    def __init__(self) -> None:
        self.texts: list[list[str]] = []
        for variant in range(TEMPLATES):
            found = facts(self._UID, self._PATIENT, self._ACCESSION, self._DAY, self._ANALYSED, self._ISSUED, variant)
            self.texts.append([json.dumps(body, ensure_ascii=False) for body in mapped(*found)])
        self._patient_id = ids.patient_id(self._PATIENT)
        self._observation_id = ids.observation_id(found[1])

    def bodies(self, who: StudyIdentity) -> list[dict[str, Any]]:
        finding_id = ids.observation_id(
            ImageFinding(f"{who.uid}.1.1", f"{who.uid}.1", 0.0, "", MODEL.threshold, MODEL, who.analysed)
        )
        pairs = (
            (self._patient_id, ids.patient_id(who.patient)), (self._observation_id, finding_id),
            (self._UID, who.uid), (self._ACCESSION, who.accession), (self._DAY.isoformat(), who.day.isoformat()),
            (_instant(self._ANALYSED), _instant(who.analysed)), (_instant(self._ISSUED), _instant(who.issued)),
        )
        bodies = []
        for body in self.texts[who.variant]:
            for placeholder, value in pairs:
                body = body.replace(placeholder, value)
            bodies.append(json.loads(body))
        return bodies

    def check(self, sample: Sequence[StudyIdentity]) -> None:
        for who in sample:
            if self.bodies(who) != mapped(*who.facts()):
                raise AssertionError(f"template substitution differs from the mappers for study {who.number}")


# -- seeding ----------------------------------------------------------------------------------------


def schema_url(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


_RESOURCE_COLUMNS = ("id", "resource_type", "logical_id", "version_id", "last_updated", "sort_date", "sort_date_high",
                     "study_uid", "digest", "content")
_VERSION_COLUMNS = ("resource_pk", "version_id", "last_updated", "content")
_INDEX_COLUMNS = ("resource_pk", "resource_type", "param", "system", "value", "low", "high")
_SERIAL = {"id"}  # fhir_resource_version.id and fhir_search_index.id: left to their sequences


def _check_columns() -> None:
    """The copier writes every column the models declare, and nothing else (the models move with the code)."""
    from storage.models import FhirResource, FhirResourceVersion, FhirSearchIndex

    for model, columns, serial in ((FhirResource, _RESOURCE_COLUMNS, set()), (FhirResourceVersion, _VERSION_COLUMNS, _SERIAL),
                                   (FhirSearchIndex, _INDEX_COLUMNS, _SERIAL)):
        declared = {c.name for c in model.__table__.columns} - serial
        if declared != set(columns):
            raise SystemExit(f"bench/fhir.py: {model.__tablename__} now has columns {sorted(declared)}, the seeder writes "
                             f"{sorted(columns)}: teach _Copier.rows the change (as fhir_api.store.put writes it)")


class _Copier:
    """Rows for one transaction, written with three COPYs (ids of ``fhir_resource`` assigned here)."""

    def __init__(self, first_pk: int) -> None:
        self.next_pk = first_pk
        self.resources: list[tuple[Any, ...]] = []
        self.versions: list[tuple[Any, ...]] = []
        self.index: list[tuple[Any, ...]] = []

    @staticmethod
    def rows(pk: int, body: dict[str, Any], *, study_uid: str | None, now: dt.datetime) -> tuple[
            tuple[Any, ...], tuple[Any, ...], list[tuple[Any, ...]]]:
        """What :func:`fhir_api.store.put` writes for a new resource: version 1, its content, its index rows
        (in :data:`_RESOURCE_COLUMNS`, :data:`_VERSION_COLUMNS`, :data:`_INDEX_COLUMNS` order)."""
        resource_type = body["resourceType"]
        content = _served(body, 1, now)
        own_date = date_range(resource_type, body) or (None, None)
        resource = (pk, resource_type, body["id"], 1, now, own_date[0], own_date[1], study_uid, content_digest(body), content)
        index = [(pk, resource_type, e.param, e.system, e.value, e.low, e.high) for e in extract_index(resource_type, body)]
        return resource, (pk, 1, now, content), index

    def add(self, body: dict[str, Any], *, study_uid: str | None, now: dt.datetime) -> None:
        resource, version, index = self.rows(self.next_pk, body, study_uid=study_uid, now=now)
        self.next_pk += 1
        self.resources.append(resource)
        self.versions.append(version)
        self.index.extend(index)

    def flush(self, connection: Any) -> None:
        with connection.cursor() as cursor:
            for table, columns, rows in (("fhir_resource", _RESOURCE_COLUMNS, self.resources),
                                         ("fhir_resource_version", _VERSION_COLUMNS, self.versions),
                                         ("fhir_search_index", _INDEX_COLUMNS, self.index)):
                with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
        connection.commit()
        self.resources, self.versions, self.index = [], [], []


def check_against_store(database: Database, samples: Sequence[tuple[dict[str, Any], str | None, dt.datetime]]) -> None:
    """Write *samples* with :func:`fhir_api.store.put` (rolled back) and compare with the copier's rows.

    The seeder bypasses ``store.put`` for speed; this proves it writes the same rows, column for
    column, whatever ``store.put`` does today (the check runs on every seeding).
    """
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from fhir_api import store
    from storage.models import FhirResource, FhirResourceVersion, FhirSearchIndex

    session = Session(database.engine)
    try:
        for body, study_uid, now in samples:
            stored = store.put(session, body, study_uid=study_uid, now=now)
            assert stored is not None
            row = session.execute(select(FhirResource).where(FhirResource.id == stored.pk)).scalar_one()
            version = session.execute(
                select(FhirResourceVersion).where(FhirResourceVersion.resource_pk == stored.pk)
            ).scalar_one()
            index = session.execute(
                select(FhirSearchIndex).where(FhirSearchIndex.resource_pk == stored.pk).order_by(FhirSearchIndex.id)
            ).scalars().all()
            resource, version_row, index_rows = _Copier.rows(stored.pk, body, study_uid=study_uid, now=now)
            found = (
                tuple(getattr(row, c) for c in _RESOURCE_COLUMNS),
                tuple(getattr(version, c) for c in _VERSION_COLUMNS),
                [tuple(getattr(i, c) for c in _INDEX_COLUMNS) for i in index],
            )
            if found != (resource, version_row, index_rows):
                raise AssertionError(f"the seeder's rows for {body['resourceType']}/{body['id']} differ from store.put's:\n"
                                     f"store.put: {found!r:.3000}\nseeder:    {(resource, version_row, index_rows)!r:.3000}")
    finally:
        session.rollback()
        session.close()


def seed_fingerprint(reports: int, samples: Sequence[tuple[dict[str, Any], str | None, dt.datetime]]) -> str:
    """What a seeded schema depends on: the tables as the models declare them and the rows of a sample.

    A change to the models, the mappers, the serialisation or the index extraction changes it, and
    ``--seed`` then seeds again rather than measuring the new code on old rows.
    """
    import hashlib

    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    from storage.models import FhirResource, FhirResourceVersion, FhirSearchIndex

    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    ddl = []
    for model in (FhirResource, FhirResourceVersion, FhirSearchIndex):
        table = model.__table__
        ddl.append(str(CreateTable(table).compile(dialect=dialect)))
        ddl.extend(sorted(str(CreateIndex(ix).compile(dialect=dialect)) for ix in table.indexes))
    rows = [_Copier.rows(n, body, study_uid=study_uid, now=now) for n, (body, study_uid, now) in enumerate(samples)]
    document = json.dumps({"reports": reports, "ddl": ddl, "rows": rows}, default=str, sort_keys=True)
    return hashlib.sha256(document.encode()).hexdigest()


def _seeded(base: str, schema: str) -> dict[str, Any] | None:
    """The ``bench_seed`` row of *schema*, or None when it was never (completely) seeded."""
    database = Database(base)
    try:
        with database.engine.connect() as connection:
            if connection.execute(text("SELECT to_regclass(:t)"), {"t": f"{schema}.bench_seed"}).scalar() is None:
                return None
            row = connection.execute(text(f'SELECT fingerprint, reports, summary FROM "{schema}".bench_seed')).one_or_none()
            return None if row is None else {"fingerprint": row[0], "reports": row[1], "summary": json.loads(row[2])}
    finally:
        database.dispose()


def _sample_bodies(reports: int) -> tuple[Templates, Any, list[tuple[dict[str, Any], str | None, dt.datetime]]]:
    """The templates, the identity of each study, and the resources of a few studies (for the checks)."""
    templates = Templates()
    patients_of = study_patients(reports)
    cache: dict[int, PatientFacts] = {}

    def identity(number: int) -> StudyIdentity:
        p = patients_of[number]
        if p not in cache:
            cache[p] = patient_facts(p)
        return StudyIdentity.of(number, cache[p], reports)

    rng = random.Random(7)
    sample = [identity(n) for n in sorted({0, reports - 1, *rng.sample(range(reports), min(reports, 48))})]
    templates.check(sample)
    bodies: list[tuple[dict[str, Any], str | None, dt.datetime]] = [(resources.device(MODEL), None, sample[0].issued)]
    for who in sample[:4]:
        bodies.append((resources.patient(who.patient), None, who.issued))
        bodies.extend((body, who.uid, who.issued) for body in templates.bodies(who))
    return templates, identity, bodies


def seed(base: str, schema: str, reports: int, *, batch: int = 1000) -> dict[str, Any]:
    """Fill *schema* with *reports* studies (see the module docstring); returns what it did and how long it took."""
    from storage.migrate import upgrade

    _check_columns()
    started = time.perf_counter()
    templates, identity, samples = _sample_bodies(reports)
    fingerprint = seed_fingerprint(reports, samples)
    held = _seeded(base, schema)
    if held is not None and held["fingerprint"] == fingerprint:
        print(f"seed: {schema} already holds {reports} studies seeded by this code, skipped", flush=True)
        return {"skipped": True, "fingerprint": fingerprint, "seeded": held["summary"]}
    if held is not None:
        print(f"seed: {schema} was seeded with {held['reports']} studies by other code (models, mappers or index): "
              "seeding again", flush=True)
    admin = Database(base)
    with admin.engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    database = Database(schema_url(base, schema))
    upgrade(database)
    check_against_store(database, samples)
    checked = time.perf_counter()

    patients_of = study_patients(reports)
    raw = database.engine.raw_connection()
    connection = raw.driver_connection
    copier = _Copier(1)
    seen_patients: set[int] = set()
    counts = {"Patient": 0, "ImagingStudy": 0, "Device": 0, "Observation": 0, "DiagnosticReport": 0}
    rows = {"fhir_resource": 0, "fhir_search_index": 0}
    try:
        for number in range(reports):
            who = identity(number)
            imaging_study, observation, report = templates.bodies(who)
            p = patients_of[number]
            if p not in seen_patients:  # the projection's order: Patient, ImagingStudy, Device, Observation, report
                seen_patients.add(p)
                copier.add(resources.patient(who.patient), study_uid=None, now=who.issued)
                counts["Patient"] += 1
            copier.add(imaging_study, study_uid=who.uid, now=who.issued)
            if number == 0:
                copier.add(resources.device(MODEL), study_uid=None, now=who.issued)
                counts["Device"] += 1
            copier.add(observation, study_uid=who.uid, now=who.issued)
            copier.add(report, study_uid=who.uid, now=who.issued)
            counts["ImagingStudy"] += 1
            counts["Observation"] += 1
            counts["DiagnosticReport"] += 1
            if (number + 1) % batch == 0 or number == reports - 1:
                rows["fhir_resource"] += len(copier.resources)
                rows["fhir_search_index"] += len(copier.index)
                copier.flush(connection)
                if (number + 1) % (batch * 10) == 0:
                    print(f"seed: {number + 1}/{reports} studies, {time.perf_counter() - started:.0f} s", flush=True)
        with connection.cursor() as cursor:  # the ids were assigned here: move the sequence past them
            cursor.execute("SELECT setval(pg_get_serial_sequence('fhir_resource', 'id'), %s)", (copier.next_pk - 1,))
        connection.commit()
    finally:
        raw.close()
    loaded = time.perf_counter()
    with database.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(text("VACUUM (ANALYZE) fhir_resource, fhir_resource_version, fhir_search_index"))
        sizes = {
            name: conn.execute(text("SELECT pg_size_pretty(pg_total_relation_size(:t))"), {"t": name}).scalar_one()
            for name in ("fhir_resource", "fhir_resource_version", "fhir_search_index")
        }
    done = time.perf_counter()
    summary = {
        "skipped": False, "reports": reports, "resources": counts, "rows": rows, "sizes": sizes,
        "seconds": {"templates_and_checks": round(checked - started, 1), "generate_and_copy": round(loaded - checked, 1),
                    "vacuum_analyze": round(done - loaded, 1), "total": round(done - started, 1)},
    }
    with database.engine.begin() as conn:  # last: a schema without this row is an interrupted seeding
        conn.execute(text("CREATE TABLE bench_seed (fingerprint text NOT NULL, reports integer NOT NULL, "
                          "seeded_at timestamptz NOT NULL DEFAULT now(), summary text NOT NULL)"))
        conn.execute(text("INSERT INTO bench_seed (fingerprint, reports, summary) VALUES (:f, :r, :s)"),
                     {"f": fingerprint, "r": reports, "s": json.dumps(summary)})
    database.dispose()
    print(f"seed: {json.dumps(summary)}", flush=True)
    return {**summary, "fingerprint": fingerprint}


# -- the servers (child processes) ------------------------------------------------------------------


def _wait_for_sigterm() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def serve_api(url: str, port: int, jwks_file: Path, work: Path) -> None:
    """The FHIR API as ``pneumo serve`` builds it (gateway/app.py), on *port*, until SIGTERM."""
    from audit.events import AuditSource
    from audit.store import AuditSigner, signer_session_info
    from conf.settings import FhirSettings
    from fhir_api.api import FhirApi, install
    from fhir_api.audit_trail import AuditTrail
    from fhir_api.auth import TokenVerifier
    from gateway.http import HttpServer, build_app
    from storage.filestore import FileStore
    from tests.fhir_api.tokens import AUDIENCE, ISSUER

    signer = AuditSigner(os.urandom(32))  # audit.hmac_key_file set, as a production site has it
    database = Database(url, session_info=signer_session_info(signer))
    settings = FhirSettings.model_validate({
        "bind": "127.0.0.1", "port": port,
        "auth": {"mode": "jwt", "issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks_file)},
    })
    trail = AuditTrail(database)
    trail.start()
    api = FhirApi(
        database, FileStore(work / "dicom", work / "tmp", fsync=False), TokenVerifier(settings.auth, bind=settings.bind),
        trail, AuditSource("PNEUMO@bench"), settings, software_version="bench",
    )
    app = build_app(lambda: {"database": database.ping()})
    install(app, api)
    http = HttpServer(app, "127.0.0.1", port)
    http.start()
    try:
        _wait_for_sigterm()
    finally:
        http.stop()
        trail.stop()
        database.dispose()


def serve_floor(url: str, port: int) -> None:
    """The floor: one ``def`` route, one indexed row, no auth, no audit; same Database, same uvicorn settings."""
    from fastapi import FastAPI
    from fastapi.responses import Response

    from gateway.http import HttpServer

    database = Database(url)
    app = FastAPI(docs_url=None, redoc_url=None)
    query = text("SELECT content FROM fhir_resource WHERE resource_type = 'DiagnosticReport' AND logical_id = :id")

    @app.get("/floor/{logical_id}")
    def floor(logical_id: str) -> Response:
        with database.read_session() as session:
            content = session.execute(query, {"id": logical_id}).scalar_one_or_none()
        if content is None:
            return Response(status_code=404)
        return Response(content, media_type="application/fhir+json")

    http = HttpServer(app, "127.0.0.1", port)
    http.start()
    try:
        _wait_for_sigterm()
    finally:
        http.stop()
        database.dispose()


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    port: int


@contextmanager
def child_server(kind: str, url: str, work: Path, jwks_file: Path) -> Iterator[Child]:
    port = free_port()
    log = open(work / f"{kind}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--url", url, "--port", str(port),
         "--jwks", str(jwks_file), "--work", str(work)],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    try:
        wait_for_port(port, 60)
        yield Child(kind, proc, port)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


# -- load -------------------------------------------------------------------------------------------

WRK_SCRIPT = r"""
-- Random pre-formatted requests from a file of paths; counts answers that are not 200.
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  local paths, tokens = {}, {}
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  if args[2] ~= "-" then for line in io.lines(args[2]) do tokens[#tokens + 1] = line end end
  math.randomseed(tonumber(args[3]))
  reqs = {}
  for i = 1, #paths do
    local headers = {["Accept"] = "application/fhir+json"}
    if #tokens > 0 then headers["Authorization"] = "Bearer " .. tokens[(i % #tokens) + 1] end
    reqs[i] = wrk.format("GET", paths[i], headers)
  end
  non200 = 0
end
function request() return reqs[math.random(#reqs)] end
function response(status, headers, body) if status ~= 200 then non200 = non200 + 1 end end
function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do bad = bad + t:get("non200") end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"non200":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, bad, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass
class Measurement:
    scenario: str
    clients: int
    requests: int
    seconds: float
    per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non200: int
    socket_errors: int
    kb_per_response: float
    # CPU during the measurement, in cores (1.0 = one core busy all the time); the machine has os.cpu_count().
    server_cpu: float  # the server process (API or floor)
    postgres_cpu: float  # every PostgreSQL process (ours, and anyone else's: see other_cpu)
    client_cpu: float  # wrk
    other_cpu: float  # everything else: anything above ~0.1 means the machine was not quiet
    machine_cpu: float
    server_cpu_ms_per_request: float
    postgres_cpu_ms_per_request: float
    postgres_sessions_opened: int  # new connections during the run (anyone's): a pool that reconnects under load
    load_before: float


def _proc_cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime + stime of a process (all its threads), plus what its exited children used when *children*."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _postgres_cpu_seconds() -> dict[int, float]:
    """CPU seconds of every PostgreSQL process (the server's backends, and anyone else's), the postmaster's
    exited children included: a connection opened and closed within a run is a backend that lived and
    died between two looks at /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    found[int(entry.name)] = _proc_cpu_seconds(int(entry.name), children=True)
            except OSError:
                continue
    return found


def _postgres_sessions(database: Database) -> int:
    """Connections PostgreSQL has accepted so far (all databases): a pool that keeps reconnecting shows here."""
    with database.engine.connect() as connection:
        return int(connection.execute(text("SELECT sum(sessions) FROM pg_stat_database")).scalar_one() or 0)


def _machine_busy_seconds() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(pid: int, database: Database, *, below: float = 0.05, timeout: float = 300.0) -> float:
    """Wait until the server process is idle and PostgreSQL runs no statement on the FHIR tables; returns seconds waited.

    A client that stops (the end of a warm-up or of a run) leaves its last requests running in
    the server and their statements in PostgreSQL: ``def`` routes are not cancelled when the
    connection closes. Without this, the next run would start behind a backlog that is not its own.
    """
    started = time.monotonic()
    quiet = 0
    last = _proc_cpu_seconds(pid)
    busy = text("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid() "
                "AND query ILIKE '%fhir_%'")
    while quiet < 2 and time.monotonic() - started < timeout:
        time.sleep(0.25)
        now = _proc_cpu_seconds(pid)
        with database.engine.connect() as connection:
            statements = connection.execute(busy).scalar_one()
        quiet = quiet + 1 if (now - last) / 0.25 < below and statements == 0 else 0
        last = now
    return time.monotonic() - started


def wait_for_quiet(*, below: float = 0.1, timeout: float = 900.0) -> float:
    """Wait until the machine is idle (under *below* cores busy over 2 s, our servers being idle too);
    returns the last figure. The machine is shared (test suites, other benchmarks): a run that
    competes with them for the 2 cores measures them too."""
    deadline = time.monotonic() + timeout
    while True:
        before = _machine_busy_seconds()
        time.sleep(2.0)
        busy = (_machine_busy_seconds() - before) / 2.0
        if busy < below or time.monotonic() > deadline:
            return busy


def run_wrk(port: int, paths_file: Path, tokens_file: Path | None, clients: int, seconds: float, script: Path) -> dict[str, Any]:
    args = ["wrk", "-t", "1", "-c", str(clients), "-d", f"{max(1, round(seconds))}s", "--timeout", "30s", "-s", str(script),
            f"http://127.0.0.1:{port}", "--", str(paths_file), str(tokens_file) if tokens_file else "-",
            str(random.randrange(1, 2**31))]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    line = next((row for row in out.splitlines() if row.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result:\n{out}")
    result: dict[str, Any] = json.loads(line[len("WRKJSON "):])
    return result


def measure(child: Child, scenario: str, paths_file: Path, tokens_file: Path | None, clients: int, *, seconds: float,
            warmup: float, script: Path, database: Database, min_requests: int = 0, max_seconds: float = 120.0) -> Measurement:
    """One warm-up (discarded), then one measured run; a run with fewer than *min_requests* answers is
    measured again for longer (up to *max_seconds*), so that a slow search still gets a p99 worth the name."""
    load_before = os.getloadavg()[0]
    if warmup > 0:
        run_wrk(child.port, paths_file, tokens_file, clients, warmup, script)
        wait_until_idle(child.proc.pid, database)
    while True:
        sessions0 = _postgres_sessions(database)
        server0, machine0, pg0 = _proc_cpu_seconds(child.proc.pid), _machine_busy_seconds(), _postgres_cpu_seconds()
        client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = run_wrk(child.port, paths_file, tokens_file, clients, seconds, script)
        client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        server1, machine1, pg1 = _proc_cpu_seconds(child.proc.pid), _machine_busy_seconds(), _postgres_cpu_seconds()
        sessions1 = _postgres_sessions(database)
        wait_until_idle(child.proc.pid, database)
        if result["requests"] >= min_requests or seconds >= max_seconds:
            break
        seconds = round(min(max_seconds, seconds * 1.2 * min_requests / max(result["requests"], 1)))
        print(f"  {scenario} c={clients}: {result['requests']} answers only, measuring again for {seconds:.0f} s", flush=True)
    wall = result["duration_us"] / 1e6
    requests = int(result["requests"])
    server = (server1 - server0) / wall
    client = (client1.ru_utime + client1.ru_stime - client0.ru_utime - client0.ru_stime) / wall
    postgres = sum(v - pg0.get(pid, 0.0) for pid, v in pg1.items()) / wall
    machine = (machine1 - machine0) / wall
    return Measurement(
        scenario=scenario, clients=clients, requests=requests, seconds=round(wall, 2),
        per_second=round(requests / wall, 1), p50_ms=result["p50_us"] / 1000, p90_ms=result["p90_us"] / 1000,
        p99_ms=result["p99_us"] / 1000, max_ms=result["max_us"] / 1000, non200=int(result["non200"]),
        socket_errors=int(result["socket_errors"]), kb_per_response=round(result["bytes"] / max(requests, 1) / 1024, 2),
        server_cpu=round(server, 2), postgres_cpu=round(postgres, 2), client_cpu=round(client, 2),
        other_cpu=round(max(0.0, machine - server - postgres - client), 2), machine_cpu=round(machine, 2),
        server_cpu_ms_per_request=round((server1 - server0) * 1000 / max(requests, 1), 3),
        postgres_cpu_ms_per_request=round(postgres * wall * 1000 / max(requests, 1), 3),
        postgres_sessions_opened=sessions1 - sessions0, load_before=round(load_before, 2),
    )


@dataclass(frozen=True)
class Corpus:
    """What the requests are drawn from: the seeded report ids, patient ids and date range."""

    report_ids: list[str]
    patient_ids: list[str]
    first_day: dt.date
    last_day: dt.date

    @classmethod
    def load(cls, url: str) -> Corpus:
        database = Database(url)
        try:
            with database.engine.connect() as connection:
                reports = list(connection.execute(
                    text("SELECT logical_id FROM fhir_resource WHERE resource_type = 'DiagnosticReport'")).scalars())
                patients = list(connection.execute(
                    text("SELECT logical_id FROM fhir_resource WHERE resource_type = 'Patient'")).scalars())
                low, high = connection.execute(
                    text("SELECT min(sort_date), max(sort_date) FROM fhir_resource WHERE resource_type = 'DiagnosticReport'")
                ).one()
        finally:
            database.dispose()
        if not reports:
            raise SystemExit("no DiagnosticReports in the schema: run with --seed first")
        return cls(reports, patients, low.date(), high.date())

    def paths(self, scenario: str, count: int, rng: random.Random) -> list[str]:
        if scenario == "floor":
            return [f"/floor/{rng.choice(self.report_ids)}" for _ in range(count)]
        if scenario == "read":
            return [f"/fhir/DiagnosticReport/{rng.choice(self.report_ids)}" for _ in range(count)]
        if scenario == "patient":
            return [f"/fhir/DiagnosticReport?patient={rng.choice(self.patient_ids)}" for _ in range(count)]
        if scenario == "date":
            span = (self.last_day - self.first_day).days
            return [
                f"/fhir/DiagnosticReport?date=ge{self.first_day + dt.timedelta(days=rng.randint(0, span))}"
                "&_include=DiagnosticReport:result"
                for _ in range(count)
            ]
        raise ValueError(scenario)


def check_answers(child: Child, paths: Sequence[str], token: str | None) -> None:
    """A few requests by hand before measuring: 200, FHIR JSON, and the searches return what they should."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=f"http://127.0.0.1:{child.port}", headers=headers, timeout=30) as client:
        for path in paths:
            response = client.get(path)
            if response.status_code != 200:
                raise RuntimeError(f"{path}: {response.status_code} {response.text[:500]}")
            body = response.json()
            if "?" in path:
                entries = body.get("entry", [])
                modes = {e["search"]["mode"] for e in entries}
                if "match" not in modes:  # (no total above 1,000 matches unless _total=accurate)
                    raise RuntimeError(f"{path}: no match in {json.dumps(body)[:500]}")
                if "_include" in path and "include" not in modes:
                    raise RuntimeError(f"{path}: nothing included")


# -- EXPLAIN ----------------------------------------------------------------------------------------


def explain(url: str, corpus: Corpus) -> dict[str, list[dict[str, Any]]]:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of the statements :func:`fhir_api.search.run` issues for two searches."""
    from fhir_api import search
    from fhir_api.search_params import parse_search

    database = Database(url)
    captured: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        captured.append((statement, parameters))

    middle = corpus.first_day + (corpus.last_day - corpus.first_day) / 2
    searches = {
        "patient": [("patient", corpus.patient_ids[len(corpus.patient_ids) // 2])],
        "date": [("date", f"ge{middle.isoformat()}"), ("_include", "DiagnosticReport:result")],
    }
    plans: dict[str, list[dict[str, Any]]] = {}
    try:
        for name, params in searches.items():
            with database.read_session() as session:
                parsed = parse_search("DiagnosticReport", params, strict=False, default_count=20, max_count=200)
                search.run(session, "DiagnosticReport", parsed)  # warm
                captured.clear()
                event.listen(database.engine, "before_cursor_execute", capture)
                try:
                    started = time.perf_counter()
                    search.run(session, "DiagnosticReport", parsed)
                    elapsed = time.perf_counter() - started
                finally:
                    event.remove(database.engine, "before_cursor_execute", capture)
                statements = list(captured)
            plans[name] = [{"search_run_ms": round(elapsed * 1000, 2), "params": params}]
            raw = database.engine.raw_connection()
            try:
                with raw.driver_connection.cursor() as cursor:
                    for statement, parameters in statements:
                        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
                        plan = "\n".join(row[0] for row in cursor.fetchall())
                        plans[name].append({"sql": statement, "plan": plan})
                raw.driver_connection.rollback()
            finally:
                raw.close()
    finally:
        database.dispose()
    return plans


# -- report -----------------------------------------------------------------------------------------


def table(results: Sequence[Measurement]) -> str:
    rows = [
        "| scenario | clients | requests | req/s | p50 ms | p99 ms | non-200 | server CPU ms/req | PostgreSQL CPU ms/req "
        "| CPU: server / PostgreSQL / wrk / other (cores) | PG connections opened | vs floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        floor = next((f for f in results if f.scenario == "floor" and f.clients == m.clients), None)
        ratio = f"{m.per_second / floor.per_second:.2f}x" if floor else "-"
        rows.append(
            f"| {m.scenario} | {m.clients} | {m.requests} | {m.per_second:,.1f} | {m.p50_ms:.1f} | {m.p99_ms:.1f} "
            f"| {m.non200 + m.socket_errors} | {m.server_cpu_ms_per_request:.2f} | {m.postgres_cpu_ms_per_request:.2f} "
            f"| {m.server_cpu:.2f} / {m.postgres_cpu:.2f} / {m.client_cpu:.2f} / {m.other_cpu:.2f} "
            f"| {m.postgres_sessions_opened} | {ratio} |"
        )
    return "\n".join(rows)


def targets(results: Sequence[Measurement]) -> dict[str, Any]:
    """The issue's targets: read-by-id >= 1000/s at 16 clients and >= 0.5x the floor; search p99 <= 50 ms."""
    def find(scenario: str, clients: int) -> Measurement | None:
        return next((m for m in results if m.scenario == scenario and m.clients == clients), None)

    checks: dict[str, Any] = {}
    read, floor = find("read", 16), find("floor", 16)
    if read is not None:
        checks["read_16_per_second_ge_1000"] = {"value": read.per_second, "met": read.per_second >= 1000}
        if floor is not None:
            ratio = read.per_second / floor.per_second
            checks["read_16_vs_floor_ge_0.5"] = {"value": round(ratio, 3), "met": ratio >= 0.5}
    for m in results:
        if m.scenario in ("patient", "date"):  # no answer within the run is no p99 at all, not 0 ms
            p99 = m.p99_ms if m.requests else None
            checks[f"{m.scenario}_{m.clients}_p99_le_50ms"] = {"value": p99, "met": p99 is not None and p99 <= 50}
    checks["no_errors"] = {"value": sum(m.non200 + m.socket_errors for m in results),
                           "met": all(m.non200 == 0 and m.socket_errors == 0 for m in results)}
    busy = [f"{m.scenario}/{m.clients}: {m.other_cpu}" for m in results if m.other_cpu > OTHER_CPU_LIMIT]
    checks["quiet_machine"] = {"value": busy or "yes", "met": not busy}
    return checks


def code_under_test() -> dict[str, Any]:
    """The commit and the uncommitted changes the servers ran (the FHIR code moves; a figure needs its code)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    import hashlib

    paths = ["fhir_api", "storage", "gateway/http.py", "audit"]
    return {
        "commit": git("rev-parse", "HEAD"),
        "changed": git("status", "--short", "--", *paths).splitlines(),
        "diff_sha256": hashlib.sha256(git("diff", "HEAD", "--", *paths).encode()).hexdigest(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=POSTGRES_URL, help="PostgreSQL URL (without a search_path)")
    parser.add_argument("--schema", default=SCHEMA)
    parser.add_argument("--seed", action="store_true", help="seed the schema first (skipped when it holds --reports reports)")
    parser.add_argument("--reports", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="studies per seeding transaction")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--min-requests", type=int, default=100,
                        help="measure a run again, longer, when it got fewer answers than this (slow searches)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="the longest a run is made for --min-requests")
    parser.add_argument("--tries", type=int, default=4,
                        help=f"measure a run again when other processes used more than {OTHER_CPU_LIMIT} cores meanwhile")
    parser.add_argument("--quiet-timeout", type=float, default=300.0,
                        help="how long to wait for an idle machine before each run (then measure anyway)")
    parser.add_argument("--no-measure", action="store_true", help="seed (and explain) only")
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of the search SQL (always in the JSON)")
    parser.add_argument("--json", type=Path, default=RESULTS,
                        help=f"write the results here (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--serve", choices=("api", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--jwks", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve == "api":
        serve_api(args.url, args.port, args.jwks, args.work)
        return 0
    if args.serve == "floor":
        serve_floor(args.url, args.port)
        return 0

    if make_url(args.url).get_backend_name() != "postgresql":
        print("this benchmark needs PostgreSQL (--url)", file=sys.stderr)
        return 2
    if args.seed:
        seeding = seed(args.url, args.schema, args.reports, batch=args.batch)
    else:
        _check_columns()
        held = _seeded(args.url, args.schema)
        expected = seed_fingerprint(args.reports, _sample_bodies(args.reports)[2])
        if held is None or held["fingerprint"] != expected:
            print(f"{args.schema} is not seeded by this code (models, mappers or index extraction changed, or it was never "
                  "seeded): run with --seed", file=sys.stderr)
            return 2
        seeding = {"skipped": True, "fingerprint": expected, "seeded": held["summary"]}
    url = schema_url(args.url, args.schema)
    corpus = Corpus.load(url)
    print(f"corpus: {len(corpus.report_ids)} reports, {len(corpus.patient_ids)} patients, "
          f"{corpus.first_day} .. {corpus.last_day}", flush=True)
    plans = explain(url, corpus)  # kept in the JSON: the plans behind the figures
    if args.explain:
        for name, entries in plans.items():
            print(f"\n## EXPLAIN {name}: search.run {entries[0]['search_run_ms']} ms")
            for entry in entries[1:]:
                print(f"\n{entry['sql']}\n{entry['plan']}")
    if args.no_measure:
        return 0
    if subprocess.run(["which", "wrk"], capture_output=True).returncode != 0:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2

    from tests.fhir_api.tokens import TokenService

    results: list[Measurement] = []
    rng = random.Random(42)
    watcher = Database(url)  # sees whether PostgreSQL is still busy with a finished run's statements
    with tempfile.TemporaryDirectory(prefix="pneumo-bench-fhir-") as tmp:
        work = Path(tmp)
        tokens = TokenService(work / "idp")
        tokens_file = work / "tokens.txt"
        token_list = [tokens.token("system/*.read", client_id=f"ehr-{n}", ttl=3600) for n in range(4)]
        tokens_file.write_text("\n".join(token_list) + "\n")
        script = work / "fhir.lua"
        script.write_text(WRK_SCRIPT)
        paths: dict[str, Path] = {}
        for scenario in args.scenarios:
            paths[scenario] = work / f"{scenario}.txt"
            paths[scenario].write_text("\n".join(corpus.paths(scenario, 20000, rng)) + "\n")
        with child_server("api", url, work, tokens.jwks_file) as api, child_server("floor", url, work, tokens.jwks_file) as floor:
            for scenario in args.scenarios:
                child = floor if scenario == "floor" else api
                check_answers(child, corpus.paths(scenario, 5, rng), None if scenario == "floor" else token_list[0])
            for clients in args.clients:
                for scenario in args.scenarios:
                    child = floor if scenario == "floor" else api
                    for attempt in range(1, args.tries + 1):
                        busy = wait_for_quiet(timeout=args.quiet_timeout)
                        if busy >= 0.1:
                            print(f"  the machine is busy ({busy:.2f} cores): measuring anyway", flush=True)
                        m = measure(child, scenario, paths[scenario], None if scenario == "floor" else tokens_file, clients,
                                    seconds=args.seconds, warmup=args.warmup, script=script, database=watcher,
                                    min_requests=args.min_requests, max_seconds=args.max_seconds)
                        if m.other_cpu <= OTHER_CPU_LIMIT or attempt == args.tries:
                            break
                        print(f"  {scenario} c={clients}: others used {m.other_cpu:.2f} cores meanwhile, measuring again "
                              f"({m.per_second:.1f}/s, p99 {m.p99_ms:.1f} ms discarded)", flush=True)
                    results.append(m)
                    print(f"{scenario:<8} c={clients:<3} {m.requests:6d} req {m.per_second:8.1f}/s p50 {m.p50_ms:7.1f} ms "
                          f"p99 {m.p99_ms:7.1f} ms non-200 {m.non200} sock {m.socket_errors}; cores: server {m.server_cpu:.2f} "
                          f"pg {m.postgres_cpu:.2f} wrk {m.client_cpu:.2f} other {m.other_cpu:.2f}; "
                          f"{m.postgres_sessions_opened} PostgreSQL connections opened",
                          flush=True)

    watcher.dispose()
    print()
    print(table(results))
    checks = targets(results)
    print()
    for name, check in checks.items():
        print(f"{'met   ' if check['met'] else 'MISSED'} {name}: {check['value']}")
    document = {
        "benchmark": "fhir",
        "code": code_under_test(),
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_at_end": os.getloadavg()},
        "corpus": {"reports": len(corpus.report_ids), "patients": len(corpus.patient_ids),
                   "dates": [corpus.first_day.isoformat(), corpus.last_day.isoformat()]},
        "seeding": seeding,
        "client": "wrk, 1 thread, keep-alive; warm-up discarded",
        "seconds": args.seconds,
        "warmup": args.warmup,
        "results": [asdict(m) for m in results],
        "targets": checks,
        "explain": plans,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
