"""Shared fixtures: real sample radiographs, real databases, a real gateway on free ports."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text

from conf.settings import Settings
from storage.db import Database
from storage.migrate import upgrade

POSTGRES_URL = os.environ.get("PNEUMO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def sample(name: str) -> Path:
    """Path of a real sample file from pydicom-data / pydicom's own test files."""
    found = get_testdata_file(name)
    if found is None:
        raise FileNotFoundError(name)
    return Path(str(found))


def _postgres_available() -> str | None:
    try:
        engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL not reachable at {POSTGRES_URL}: {exc.__class__.__name__}"


_PG_SKIP_REASON = _postgres_available()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    if _PG_SKIP_REASON:
        pytest.skip(_PG_SKIP_REASON)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pneumo.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    upgrade(db)
    yield db
    db.dispose()


def copy_with_new_uids(
    source: Path,
    directory: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    mutate: Callable[[pydicom.Dataset], Any] | None = None,
) -> Path:
    """Write a copy of a real sample with fresh (or given) UIDs, keeping its encoding."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if mutate is not None:
        mutate(ds)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


#: The pydicom sample radiographs are adults' (RG1 born 1940, RG3 1979), outside the bundled
#: model's intended age range (1-5 years), and many synthetic test headers carry no age. Tests of
#: the transport, storage and reporting use them anyway, so the test settings widen the age rule
#: (``[inference]``, docs/configuration.md) unless a test overrides these keys; a test of the
#: shipped rules sets them back to None ("the model's") and "not-analysed".
ADULT_SAMPLE_RULES: dict[str, Any] = {"min_age_years": 0, "max_age_years": 150, "unknown_age": "analyse"}
SHIPPED_AGE_RULES: dict[str, Any] = {"min_age_years": None, "max_age_years": None, "unknown_age": "not-analysed"}


def make_settings(
    tmp_path: Path, database_url: str | None = None, sections: dict[str, Any] | None = None, **dicom: Any
) -> Settings:
    """Settings for a gateway on free ports under *tmp_path*, loopback peers only.

    *sections* adds other top-level sections, e.g. ``{"inference": {"model_dir": ...}}``; the
    ``inference`` section is merged over :data:`ADULT_SAMPLE_RULES`.
    """
    sections = dict(sections or {})
    sections["inference"] = {**ADULT_SAMPLE_RULES, **sections.get("inference", {})}
    # Ingest tests look at queued jobs; workflow tests turn the workers on explicitly. An in-process
    # gateway has no configuration file to hand to worker processes: its workers are its threads.
    sections["worker"] = {"processes": 0, **sections["worker"]} if "worker" in sections else {"enabled": False, "processes": 0}
    peers = dicom.pop(
        "peers",
        [
            {"ae_title": "STORESCU", "host": "127.0.0.1", "port": 11113},
            {"ae_title": "ECHOSCU", "host": "127.0.0.1"},
            {"ae_title": "TESTSCU", "host": "127.0.0.1"},
        ],
    )
    return Settings.model_validate(
        {
            "data_dir": tmp_path / "var",
            "database_url": database_url,
            "dicom": {"ae_title": "PNEUMO", "port": 0, "bind": "127.0.0.1", "peers": peers, **dicom},
            "fhir": {"port": 0},
            "hl7": {"port": 0},
            "log": {"format": "json"},
            **sections,
        }
    )


def dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"DCMTK tool {tool!r} not installed (apt-get install dcmtk)")
    return path


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start in-process gateways (real DICOM + HTTP listeners on free ports); stopped afterwards."""
    from gateway.app import Gateway, open_runtime

    started: list[Any] = []

    def _start(database_url: str | None = None, sections: dict[str, Any] | None = None, **dicom: Any) -> Any:
        settings = make_settings(tmp_path, database_url, sections, **dicom)
        runtime = open_runtime(settings)
        gateway = Gateway(runtime)
        gateway.start()
        started.append(gateway)
        return gateway

    yield _start
    for gateway in started:
        gateway.stop()
        gateway.runtime.close()


def sample_ai_result() -> Any:
    """One valid classifier result for tests that need a report to send (SR, summary image)."""
    import datetime as dt

    from dicom_node.ai_result import AiResult

    return AiResult(
        probability=0.83,
        threshold=0.5,
        model_id="pneumo-test",
        model_name="Pneumo test model",
        model_version="1.0.0",
        manufacturer="Pneumo Gateway tests",
        device_uid="1.2.826.0.1.3680043.8.498.1",
        intended_use="Test only",
        completed_at=dt.datetime(2026, 11, 28, 6, 0, tzinfo=dt.UTC),
    )


def wait_until(condition: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll *condition* (with a deadline) until it returns something truthy, and return that."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def free_port() -> int:
    """A TCP port nothing listens on right now (for a peer that starts later in the test)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
