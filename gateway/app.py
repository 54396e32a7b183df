"""The composition root: builds every part from one Settings object and runs them together.

Nothing else in the code base constructs engines, stores or servers; parts receive what they
need as arguments (docs/architecture.md §6.5).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import structlog
from prometheus_client import CollectorRegistry, ProcessCollector

from audit.anchor import AnchorFile, AnchorOptions, ChainAnchor, load_signer
from audit.builders import application_activity
from audit.events import AuditEvent, AuditSource
from audit.forwarder import AuditForwarder, build_forwarder
from audit.store import AuditSigner, signer_session_info
from audit.store import append as append_audit
from conf.fingerprint import config_fingerprint
from conf.settings import Settings
from conf.tls import server_context
from dicom_node.delivery_channel import DicomChannel
from dicom_node.ingest import Ingestor
from dicom_node.query_retrieve import QueryRetrieveService
from dicom_node.reports import DicomReports
from dicom_node.server import DicomNode
from fhir_api.api import FhirApi, install
from fhir_api.audit_trail import AuditTrail
from fhir_api.auth import TokenVerifier
from fhir_api.console.app import Console, ModelSource, install_console
from fhir_api.notifications import SubscriptionChannel, rest_hook_verify
from fhir_api.projection import StudyProjectionHandler
from gateway.acceptors import AcceptorProcesses, WorkerProcesses
from gateway.http import HttpServer, build_app, instrument
from hl7.inbound import InboundService
from hl7.mllp import MllpServer
from hl7.results_channel import Hl7ResultChannel
from inference.analyser import ClassifierAnalyser
from inference.applicability import rules_from_settings
from inference.drift import DriftCollector
from inference.engine import EngineOptions, InferenceEngine
from inference.errors import ModelPackageError
from inference.example_dicom import wrap_radiograph
from inference.manifest import BUNDLED_MODEL_DIR, load_manifest
from inference.model_health import model_health
from storage import jobs
from storage.associations import AssociationRecorder
from storage.db import Database
from storage.filestore import FileStore
from storage.image_results import ImageResultHandler, ImageResultOptions
from storage.integrity import run_checks
from storage.job_kinds import DELIVER_JOB, INFER_JOB, STUDY_CHANGED_JOB, STUDY_RESULT_JOB
from storage.keyring import load_keyring
from storage.metrics import DatabaseCollector
from storage.migrate import is_current, upgrade
from storage.outbox import Channel, ChannelSender, Fanout, OutboxHandler, Route
from storage.processes import process_alive
from storage.runtime import GivesWay, JobKind, JobRegistry, JobWorker, RetryPolicy, WorkerOptions
from storage.study_results import StudyResultHandler
from storage.tracing import NOOP_TRACER, Tracer
from storage.wakeup import INFER, WakeSender

log = structlog.get_logger(__name__)


@dataclass
class Runtime:
    """The long-lived objects of one process, built once by :func:`open_runtime`."""

    settings: Settings
    database: Database
    store: FileStore
    audit_source: AuditSource
    host_name: str = field(default_factory=socket.gethostname)

    def audit(self, event: AuditEvent) -> None:
        """Write a stand-alone audit event in its own transaction."""
        with self.database.session() as session:
            append_audit(session, event)

    def close(self) -> None:
        self.store.close()
        self.database.dispose()


@contextlib.contextmanager
def runtime_for(settings: Settings, *, migrate: bool = True, startup_checks: bool = False) -> Iterator[Runtime]:
    """``with runtime_for(settings) as runtime:`` — what every short CLI command runs inside."""
    runtime = open_runtime(settings, migrate=migrate, startup_checks=startup_checks)
    try:
        yield runtime
    finally:
        runtime.close()


def open_runtime(settings: Settings, *, migrate: bool = True, startup_checks: bool = False) -> Runtime:
    """Open the database (migrating it) and the file store.

    With *startup_checks* (the long-running processes: ``serve``, ``worker``) the database file
    is checked before the migrations touch it, and the database must index this file store
    (:mod:`storage.integrity`); otherwise :class:`~storage.integrity.StoreIntegrityError` is
    raised and nothing is served. Short commands skip them: ``pneumo db check`` runs them on demand.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # The audit signer rides in Session.info so every audit.store.append seals with the HMAC key.
    signer = load_signer(settings.audit.hmac_key_file, settings.audit.retired_hmac_key_files)
    database = Database(
        settings.effective_database_url,
        sqlite_synchronous=settings.storage.sqlite_synchronous,
        session_info=signer_session_info(signer),
    )
    if startup_checks:
        try:
            _run_startup_checks(settings, database, migrate=migrate)
        except BaseException:
            database.dispose()
            raise
    elif migrate:
        upgrade(database)
    store = FileStore(
        settings.dicom_dir, settings.tmp_dir, fsync=settings.storage.fsync,
        min_free_bytes=settings.storage.min_free_mb * 2**20,
        keyring=load_keyring(settings.storage.encryption),  # None: encryption at rest off
    )
    host = socket.gethostname()
    return Runtime(
        settings=settings,
        database=database,
        store=store,
        audit_source=AuditSource(source_id=f"{settings.dicom.ae_title}@{host}"),
        host_name=host,
    )


def _run_startup_checks(settings: Settings, database: Database, *, migrate: bool) -> None:
    report = run_checks(database, settings.dicom_dir, initialise=True, migrate=migrate)
    for warning in report.warnings:
        log.warning("storage.startup_check_warning", detail=warning)
    if not report.ok:
        log.error("storage.startup_check_failed", problems=report.problems)
        report.raise_if_failed()
    log.info("storage.startup_checks_passed", **{k: v for k, v in report.facts.items() if k != "quick_check"})


def build_engine(settings: Settings) -> InferenceEngine:
    """Load and verify the model package (refuses a package whose ONNX hash does not match)."""
    manifest = load_manifest(settings.inference.model_dir or BUNDLED_MODEL_DIR)
    options = EngineOptions(
        intra_op_threads=settings.inference.intra_op_threads,
        allow_cuda=settings.inference.allow_cuda,
        max_batch=settings.inference.max_batch,
        max_wait_ms=settings.inference.max_wait_ms,
    )
    return InferenceEngine(manifest, options)


def build_tracer(settings: Settings, process_role: str) -> Tracer:
    """This process's tracer (docs/operations.md, "Tracing"): the no-op unless ``[tracing]
    enabled``; only then is the OpenTelemetry SDK imported (:mod:`gateway.tracing`).
    Shut it down when the process stops, so the spans still buffered are exported."""
    if not settings.tracing.enabled:
        return NOOP_TRACER
    try:
        from gateway.tracing import OtelTracer
    except ImportError as exc:
        raise RuntimeError(
            "[tracing] enabled = true needs the tracing extra: pip install 'pneumo-gateway[tracing]'"
        ) from exc
    log.info("tracing.enabled", endpoint=settings.tracing.otlp_endpoint, sample_ratio=settings.tracing.sample_ratio)
    return OtelTracer(settings.tracing, process_role=process_role)


def result_fanout(settings: Settings) -> Fanout:
    """Where results go, from settings: generated DICOM objects to every ``dicom.destinations``
    entry; study results (ORU^R01) to every ``hl7.destinations`` entry. FHIR notifications are
    routed by the Subscriptions themselves (:mod:`fhir_api.subscriptions`)."""
    return Fanout(
        objects=[Route(Channel.DICOM, d.name) for d in settings.dicom.destinations],
        study_results=[Route(Channel.HL7, d.name) for d in settings.hl7.destinations],
    )


def dicom_channel(runtime: Runtime) -> DicomChannel:
    """The outbox's ``dicom`` sender (it keeps associations open: close it on shutdown)."""
    settings = runtime.settings
    return DicomChannel(
        runtime.store,
        list(settings.dicom.destinations),
        calling_ae=settings.delivery.calling_ae_title or settings.dicom.ae_title,
        timeout=settings.delivery.timeout_seconds,
        audit_source=runtime.audit_source,
        local_host=runtime.host_name,
        association_idle_seconds=settings.delivery.association_idle_seconds,
        tls=settings.dicom.tls,
    )


def outbox_kind(runtime: Runtime, dicom_sender: DicomChannel, tracer: Tracer = NOOP_TRACER) -> JobKind:
    """The ``deliver`` job kind: the outbox handler with every channel's sender."""
    settings = runtime.settings
    retry = RetryPolicy(
        max_attempts=settings.delivery.max_attempts,
        backoff_base=settings.delivery.backoff_base_seconds,
        backoff_cap=settings.delivery.backoff_cap_seconds,
    )
    subscription_channel = SubscriptionChannel(
        runtime.database, runtime.audit_source, timeout=settings.delivery.timeout_seconds,
        verify=rest_hook_verify(settings.fhir.tls),
    )
    senders: list[ChannelSender] = [dicom_sender, subscription_channel, Hl7ResultChannel(settings.hl7, runtime.audit_source)]
    return JobKind(
        DELIVER_JOB, OutboxHandler(runtime.database, senders, settings.delivery.max_attempts, tracer=tracer), retry
    )


def build_fhir_api(runtime: Runtime, trail: AuditTrail, *, config_dir: Path | None) -> FhirApi:
    """The FHIR API's state; its authentication mode is checked here (refused, or logged loudly)."""
    settings = runtime.settings
    verifier = TokenVerifier(settings.fhir.auth, bind=settings.fhir.bind, base_dir=config_dir)
    for warning in verifier.warnings:
        log.warning("fhir.auth_warning", detail=warning)
    if settings.fhir.auth.mode == "anonymous":
        log.warning("fhir.auth_anonymous", detail="FHIR API open WITHOUT authentication (loopback only); "
                    "set [fhir.auth] mode = \"jwt\" before any other host can reach it", bind=settings.fhir.bind)
    return FhirApi(
        runtime.database, runtime.store, verifier, trail, runtime.audit_source, settings.fhir,
        software_version=_software_version(), subscription_endpoints=settings.fhir.subscription_endpoints,
    )


def build_console(runtime: Runtime, fhir: FhirApi, signer: AuditSigner) -> Console:
    """The operator console (docs/console.md) over the FHIR API's state; the Model page reads the
    model package this host would load (a worker host on another version shows in its results)."""
    settings = runtime.settings
    model: ModelSource
    try:
        manifest = load_manifest(settings.inference.model_dir or BUNDLED_MODEL_DIR)
    except ModelPackageError as exc:
        log.warning("console.no_model", error=str(exc))
        model = ModelSource(label=None, health=lambda: None)
    else:
        model = ModelSource(
            label=f"{manifest.name} {manifest.version}",
            health=lambda: model_health(runtime.database, manifest, settings.monitoring),
        )
    return Console(
        fhir, settings.console, bind=settings.fhir.bind, signer=signer, anchor_file=AnchorFile(settings.audit_anchor_file),
        model=model, token_endpoint=settings.fhir.auth.token_endpoint,
    )


def _software_version() -> str:
    try:
        return version("pneumo-gateway")
    except PackageNotFoundError:
        return "0+unknown"


class Workers:
    """The job workers of a process, and the one handler per job kind they run:

    * ``infer`` (:class:`~storage.image_results.ImageResultHandler`): the classifier from
      ``inference``, the SR and summary image from ``dicom_node``;
    * ``study-result`` (:class:`~storage.study_results.StudyResultHandler`);
    * ``study-changed`` (:class:`~fhir_api.projection.StudyProjectionHandler`): the FHIR resources;
    * ``deliver`` (:class:`~storage.outbox.OutboxHandler`) with each channel's sender.
    """

    def __init__(self, runtime: Runtime, engine: InferenceEngine, *, tracer: Tracer | None = None) -> None:
        """*tracer*: the process's (not shut down here); by default one of their own (``pneumo worker``)."""
        settings = runtime.settings
        self.engine = engine
        self._owns_tracer = tracer is None
        self.tracer = tracer if tracer is not None else build_tracer(settings, "worker")
        self._database = runtime.database
        fanout = result_fanout(settings)
        application_id = f"{settings.dicom.ae_title}/inference"
        jobs_retry = RetryPolicy(max_attempts=settings.worker.max_attempts)
        self.image_results = image_results = ImageResultHandler(
            runtime.database,
            runtime.store,
            ClassifierAnalyser(engine, rules_from_settings(settings.inference)),
            DicomReports(timezone=settings.dicom.timezone),
            fanout,
            runtime.audit_source,
            ImageResultOptions(
                summary_image=settings.inference.summary_image,
                study_stable_seconds=settings.results.study_stable_seconds,
                application_id=application_id,
            ),
            on_deliveries_queued=self.wake_deliverers,
            tracer=self.tracer,
        )
        study_results = StudyResultHandler(
            runtime.database, fanout, runtime.audit_source, application_id=application_id,
            stable_seconds=settings.results.study_stable_seconds, on_deliveries_queued=self.wake_deliverers,
        )
        projection = StudyProjectionHandler(runtime.database, on_notifications_queued=self.wake_deliverers)
        self._dicom_channel = dicom_channel(runtime)
        registry = JobRegistry([
            JobKind(INFER_JOB, image_results, jobs_retry),
            JobKind(STUDY_RESULT_JOB, study_results, jobs_retry),
            JobKind(
                STUDY_CHANGED_JOB, projection, jobs_retry,
                GivesWay(to=(INFER_JOB,), at_most=dt.timedelta(seconds=settings.worker.publication_wait_seconds))
                if settings.worker.publication_wait_seconds > 0 else None,
            ),
            outbox_kind(runtime, self._dicom_channel, self.tracer),
        ])
        options = WorkerOptions(poll_interval=settings.worker.poll_interval, lease_seconds=settings.worker.lease_seconds)
        db = runtime.database
        self.inferers = [
            JobWorker(db, registry, [INFER_JOB], options, f"infer-{i}") for i in range(max(1, settings.worker.threads))
        ]
        # Study results and deliveries get threads of their own: neither waits behind a backlog
        # of images, and a PACS that hangs delays only deliveries.
        self.others = [
            JobWorker(db, registry, [STUDY_RESULT_JOB, STUDY_CHANGED_JOB], options, "results-0"),
            *(JobWorker(db, registry, [DELIVER_JOB], options, f"deliver-{i}") for i in range(settings.delivery.threads)),
        ]

    @property
    def all(self) -> list[JobWorker]:
        return [*self.inferers, *self.others]

    def wake_inferers(self) -> None:
        for worker in self.inferers:
            worker.wake()

    def wake_deliverers(self) -> None:
        for worker in self.others:
            if DELIVER_JOB in worker.kinds:
                worker.wake()

    @property
    def running(self) -> bool:
        return all(w.running for w in self.all)

    def start(self) -> None:
        # Called before our own workers claim anything, so a job held under our own PID is from
        # an earlier process that had the same PID (PID 1 in a restarted container).
        released = jobs.release_orphans(
            self._database, socket.gethostname(), lambda pid: pid != os.getpid() and process_alive(pid)
        )
        if released:
            log.info("worker.orphans_released", jobs=released)
        self._warm_up()
        for worker in self.all:
            worker.start()

    def _warm_up(self) -> None:
        """A synthetic radiograph through the classifier and the SR/SC builders, in memory, before
        the first real one (:meth:`~storage.image_results.ImageResultHandler.warm_up`)."""
        started = time.perf_counter()
        gradient = np.linspace(0, 255, 512 * 512).reshape(512, 512).astype(np.uint8)
        try:
            self.image_results.warm_up(wrap_radiograph(gradient, comments="worker warm-up"))
        except Exception as exc:  # noqa: BLE001 - a failed warm-up costs only the first image its speed
            log.warning("worker.warm_up_failed", error=exc.__class__.__name__)
        else:
            log.info("worker.warmed_up", seconds=round(time.perf_counter() - started, 3))

    def stop(self) -> None:
        for worker in self.all:
            worker.stop()
        self._dicom_channel.close()
        self.engine.close()
        if self._owns_tracer:
            self.tracer.shutdown()


def metrics_registry(runtime: Runtime) -> CollectorRegistry:
    """What ``/metrics`` exposes (docs/operations.md, "Metrics"): the deployment's counters and
    gauges projected from the database (:class:`~storage.metrics.DatabaseCollector`, whatever
    process did the work) and this process's CPU, memory and file descriptors; the HTTP latency
    histogram is added by :func:`gateway.http.instrument`."""
    settings = runtime.settings
    registry = CollectorRegistry(auto_describe=True)
    destinations = {
        Channel.DICOM.value: [d.name for d in settings.dicom.destinations],
        Channel.HL7.value: [d.name for d in settings.hl7.destinations],
    }
    registry.register(DatabaseCollector(
        runtime.database, destinations=destinations, peers=[peer.ae_title for peer in settings.dicom.peers],
        max_rows=settings.metrics.max_rows_per_scrape,
    ))
    # Model drift (inference/drift.py): PSI of the newest results against the model package's reference.
    manifest = load_manifest(settings.inference.model_dir or BUNDLED_MODEL_DIR)
    registry.register(DriftCollector(runtime.database, manifest, settings.monitoring))
    ProcessCollector(registry=registry)  # the conventional process_* names
    return registry


def build_dicom_node(
    runtime: Runtime, *, on_queued: Callable[[], None] | None, tracer: Tracer = NOOP_TRACER
) -> DicomNode:
    """The DICOM application entity with its services (Storage, Q/R) wired to storage."""
    settings = runtime.settings
    # pynetdicom writes each incoming dataset to a temporary file; placing those files on the
    # store's file system lets the store adopt them with a hard link instead of a copy.
    tempfile.tempdir = str(settings.tmp_dir)
    ingestor = Ingestor(
        runtime.database,
        runtime.store,
        runtime.audit_source,
        local_host=runtime.host_name,
        on_conflict=settings.dicom.on_conflict,
        on_queued=on_queued,
        tracer=tracer,
    )
    query_retrieve = QueryRetrieveService(
        runtime.database, runtime.store, runtime.audit_source, settings.dicom, local_host=runtime.host_name
    )
    # One row per accepted association, from every acceptor process (the metrics of the deployment).
    recorder = AssociationRecorder(runtime.database, acceptor_host=runtime.host_name)
    return DicomNode(settings.dicom, ingestor, runtime.audit, runtime.audit_source, query_retrieve=query_retrieve,
                     record_association=recorder)


class DicomOnly:
    """An extra acceptor process (see :mod:`gateway.acceptors`): the DICOM node and nothing else.

    It must not sweep the staging directory — the parent's associations are using it. The images
    it queues wake the worker processes of this host (:mod:`storage.wakeup`)."""

    def __init__(self, runtime: Runtime) -> None:
        self._wake = WakeSender(runtime.settings.wake_dir)
        self.tracer = build_tracer(runtime.settings, "acceptor")
        self.dicom = build_dicom_node(runtime, on_queued=lambda: self._wake.notify(INFER), tracer=self.tracer)

    def start(self) -> None:
        self.dicom.start()

    def stop(self) -> None:
        self.dicom.stop()
        self._wake.close()
        self.tracer.shutdown()


class Gateway:
    """``pneumo serve``: the DICOM node, the HTTP server and the MLLP listener in this process; the
    job workers in the supervised worker processes of ``worker.processes`` (or, with 0, as
    threads here); the supervised extra acceptor processes of ``dicom.acceptor_processes``. The
    children are started by the same command line with *config_path* (None: the defaults and the
    environment, as this process read them)."""

    def __init__(self, runtime: Runtime, *, config_path: Path | None = None) -> None:
        self.runtime = runtime
        self._config_path = config_path
        self.acceptors: AcceptorProcesses | None = None
        self.worker_processes: WorkerProcesses | None = None
        settings = runtime.settings
        in_process = settings.worker.enabled and settings.worker.processes == 0
        self.tracer = build_tracer(settings, "serve")
        self.workers = Workers(runtime, build_engine(settings), tracer=self.tracer) if in_process else None
        removed = runtime.store.sweep_staging()
        if removed:
            log.info("storage.staging_swept", files=removed)
        self._wake = WakeSender(settings.wake_dir)
        self.dicom = build_dicom_node(runtime, on_queued=self._images_queued, tracer=self.tracer)
        self.audit_trail = AuditTrail(runtime.database)
        # One registry per gateway, passed down (no prometheus_client global REGISTRY).
        self.metrics = metrics_registry(runtime) if settings.metrics.enabled else None
        http_app = build_app(self.readiness, metrics=self.metrics)
        fhir = build_fhir_api(runtime, self.audit_trail, config_dir=config_path.parent if config_path else None)
        install(http_app, fhir)
        signer = load_signer(settings.audit.hmac_key_file, settings.audit.retired_hmac_key_files)
        if settings.console.enabled:
            install_console(http_app, build_console(runtime, fhir, signer))
        if self.metrics is not None:
            instrument(http_app, self.metrics)  # after install: it times the FHIR middleware's refusals too
        self.http = HttpServer(http_app, settings.fhir.bind, settings.fhir.port, tls=settings.fhir.tls)
        self.hl7: MllpServer | None = None
        if settings.hl7.enabled:
            inbound = InboundService(runtime.database, runtime.audit_source, settings.hl7)
            self.hl7 = MllpServer(
                settings.hl7.bind, settings.hl7.port, inbound.handle, on_frame_error=inbound.on_frame_error,
                max_message_bytes=settings.hl7.max_message_bytes, idle_timeout=settings.hl7.idle_timeout_seconds,
                max_connections=settings.hl7.max_connections,
                ssl_context=server_context(settings.hl7.tls) if settings.hl7.tls.enabled else None,
                on_tls_auth_failure=inbound.on_tls_auth_failure,
                on_connection_refused=inbound.on_connection_refused,
            )
        self._stopped = threading.Event()
        self._started = False
        self.anchor = ChainAnchor(
            runtime.database,
            AnchorFile(settings.audit_anchor_file, fsync=settings.storage.fsync),
            signer,
            AnchorOptions(settings.audit.anchor_every, settings.audit.anchor_interval_seconds),
        )
        # ATNA forwarding (ITI-20, syslog over TLS): built here so a bad certificate fails the start.
        self.audit_forwarder: AuditForwarder | None = None
        if settings.audit.syslog.enabled:
            self.audit_forwarder = build_forwarder(
                settings.audit.syslog, runtime.database, settings.audit_forward_cursor_file, fsync=settings.storage.fsync
            )

    def _images_queued(self) -> None:
        """New ``infer`` jobs committed: wake this process's inference threads, if it has any, and
        every worker process of this host (ours, and any ``pneumo worker`` started by hand)."""
        if self.workers is not None:
            self.workers.wake_inferers()
        self._wake.notify(INFER)

    def readiness(self) -> dict[str, bool]:
        """``/ready``: every part up, every acceptor and worker process running (a dead one is
        being restarted), and room on the disk for what a C-STORE Success promises to keep."""
        database_ok = self.runtime.database.ping()
        workers = self.workers.running if self.workers else True
        if self.worker_processes is not None:
            workers = self.worker_processes.running
        return {
            "database": database_ok,
            "migrations": database_ok and is_current(self.runtime.database),
            "dicom": self.dicom.running,
            "acceptors": self.acceptors.running if self.acceptors else True,
            "workers": workers,
            "hl7": self.hl7.running if self.hl7 else True,
            "disk": self._disk_ok(),
        }

    def _disk_ok(self) -> bool:
        """Free space of the store at or above ``storage.min_free_mb``: below it new instances
        are refused anyway, so a load balancer should send them to another node."""
        try:
            return self.runtime.store.disk_space().ok
        except OSError:  # the store's file system is gone (unmounted): certainly not ready
            return False

    def start(self) -> None:
        self.runtime.audit(
            application_activity(
                self.runtime.audit_source, started=True, process_name="pneumo serve",
                host=self.runtime.host_name, when=dt.datetime.now(dt.UTC), user=_user(),
                description=config_fingerprint(self._config_path),
            )
        )
        self._started = True
        self.anchor.start()
        if self.audit_forwarder is not None:
            self.audit_forwarder.start()
        if self.workers:
            self.workers.start()
        settings = self.runtime.settings
        if settings.worker.enabled and settings.worker.processes > 0:
            self.worker_processes = WorkerProcesses(self._config_path, settings.worker.processes)
            self.worker_processes.start()
        self.dicom.start()
        extra = self.runtime.settings.dicom.acceptor_processes - 1
        if extra > 0:
            self.acceptors = AcceptorProcesses(self._config_path, self.dicom.port, extra)
            self.acceptors.start()
        if self.hl7 is not None:
            self.hl7.start()
        self.audit_trail.start()
        self.http.start()
        log.info("gateway.started", dicom_port=self.dicom.port, http_port=self.http.port,
                 hl7_port=self.hl7.port if self.hl7 else None)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.acceptors is not None:
            self.acceptors.stop()
        self.dicom.stop()
        if self.worker_processes is not None:
            self.worker_processes.stop()
        if self.hl7 is not None:
            self.hl7.stop()
        self.http.stop()
        self.audit_trail.stop()
        if self.workers:
            self.workers.stop()
        self._wake.close()
        self.tracer.shutdown()  # after the workers: their last spans are exported too
        if not self._started:
            return
        self.runtime.audit(
            application_activity(
                self.runtime.audit_source, started=False, process_name="pneumo serve",
                host=self.runtime.host_name, when=dt.datetime.now(dt.UTC), user=_user(),
            )
        )
        self.anchor.stop()
        if self.audit_forwarder is not None:
            self.audit_forwarder.stop()  # after the Application Stop record, which it still sends
        log.info("gateway.stopped")


def process_event(runtime: Runtime, *, started: bool, process_name: str, config_path: Path | None = None) -> AuditEvent:
    """The Application Start/Stop record (PS3.15 A.5.3.1) of a long-running process; a start names
    the fingerprint of its configuration (conf/fingerprint.py), so a changed configuration shows."""
    return application_activity(
        runtime.audit_source, started=started, process_name=process_name, host=runtime.host_name,
        when=dt.datetime.now(dt.UTC), user=_user(), description=config_fingerprint(config_path) if started else None,
    )


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return None
