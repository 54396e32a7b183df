"""The composition root: builds every part from one Settings object and runs them together.

Nothing else in the code base constructs engines, stores or servers; parts receive what they
need as arguments (DESIGN.md §6.5).
"""

from __future__ import annotations

import datetime as dt
import getpass
import socket
import tempfile
import threading
from dataclasses import dataclass, field

import structlog

from audit.builders import application_activity
from audit.events import AuditEvent, AuditSource
from audit.store import append as append_audit
from conf.settings import Settings
from dicom_node.ingest import Ingestor
from dicom_node.server import DicomNode
from gateway.http import HttpServer, build_app
from storage.db import Database
from storage.filestore import FileStore
from storage.migrate import is_current, upgrade

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


def open_runtime(settings: Settings, *, migrate: bool = True) -> Runtime:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = Database(settings.effective_database_url, sqlite_synchronous=settings.storage.sqlite_synchronous)
    if migrate:
        upgrade(database)
    store = FileStore(settings.dicom_dir, settings.tmp_dir, fsync=settings.storage.fsync)
    host = socket.gethostname()
    return Runtime(
        settings=settings,
        database=database,
        store=store,
        audit_source=AuditSource(source_id=f"{settings.dicom.ae_title}@{host}"),
        host_name=host,
    )


class Gateway:
    """``pneumo serve``: the DICOM node, the HTTP server and (later) the workers, in one process."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        settings = runtime.settings
        # pynetdicom writes each incoming dataset to a temporary file; placing those files on
        # the store's file system lets the store adopt them with a hard link instead of a copy.
        tempfile.tempdir = str(settings.tmp_dir)
        removed = runtime.store.sweep_staging()
        if removed:
            log.info("storage.staging_swept", files=removed)
        self.ingestor = Ingestor(
            runtime.database,
            runtime.store,
            runtime.audit_source,
            local_host=runtime.host_name,
            on_conflict=settings.dicom.on_conflict,
        )
        self.dicom = DicomNode(settings.dicom, self.ingestor, runtime.audit, runtime.audit_source)
        self.http = HttpServer(build_app(self.readiness), settings.fhir.bind, settings.fhir.port)
        self._stopped = threading.Event()
        self._started = False

    def readiness(self) -> dict[str, bool]:
        database_ok = self.runtime.database.ping()
        return {
            "database": database_ok,
            "migrations": database_ok and is_current(self.runtime.database),
            "dicom": self.dicom.running,
        }

    def start(self) -> None:
        self.runtime.audit(
            application_activity(
                self.runtime.audit_source, started=True, process_name="pneumo serve",
                host=self.runtime.host_name, when=dt.datetime.now(dt.UTC), user=_user(),
            )
        )
        self._started = True
        self.dicom.start()
        self.http.start()
        log.info("gateway.started", dicom_port=self.dicom.port, http_port=self.http.port)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.dicom.stop()
        self.http.stop()
        if not self._started:
            return
        self.runtime.audit(
            application_activity(
                self.runtime.audit_source, started=False, process_name="pneumo serve",
                host=self.runtime.host_name, when=dt.datetime.now(dt.UTC), user=_user(),
            )
        )
        log.info("gateway.stopped")


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return None
