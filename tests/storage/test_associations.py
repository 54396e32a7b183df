"""``storage.associations``: the recorder of accepted DICOM associations, on SQLite and PostgreSQL
(the ``database`` fixture runs both). The DICOM side is tests/dicom_node/test_association_records.py."""

from __future__ import annotations

import datetime as dt
import os

import pytest
from sqlalchemy import select

from storage.associations import AssociationRecorder, EndedAssociation
from storage.db import Database
from storage.models import DicomAssociation, DicomAssociationEnd

STARTED = dt.datetime(2026, 12, 1, 4, 0, tzinfo=dt.UTC)


def _ended(**changes: object) -> EndedAssociation:
    fields: dict[str, object] = {
        "calling_ae": "MODALITY", "called_ae": "PNEUMO", "peer_address": "10.0.0.7",
        "ended_by": DicomAssociationEnd.ABORTED, "started_at": STARTED, "ended_at": STARTED + dt.timedelta(seconds=1.5),
        "instances_stored": 1, "instances_refused": 2,
    }
    fields.update(changes)
    return EndedAssociation(**fields)  # type: ignore[arg-type]


def test_one_row_per_call_with_this_process_as_the_acceptor(database: Database) -> None:
    record = AssociationRecorder(database, acceptor_host="gw-1")
    first = record(_ended())
    second = record(_ended(ended_by=DicomAssociationEnd.CLOSED, peer_address=None))
    with database.read_session() as session:
        rows = list(session.execute(select(DicomAssociation).order_by(DicomAssociation.id)).scalars())
    assert [row.id for row in rows] == [first, second]
    row = rows[0]
    assert (row.calling_ae, row.called_ae, row.peer_address, row.ended_by) == ("MODALITY", "PNEUMO", "10.0.0.7", "aborted")
    assert (row.instances_stored, row.instances_refused, row.tls) == (1, 2, False)
    assert (row.acceptor_host, row.acceptor_pid) == ("gw-1", os.getpid())
    assert (row.started_at, row.ended_at) == (STARTED, STARTED + dt.timedelta(seconds=1.5))
    assert (rows[1].ended_by, rows[1].peer_address) == ("closed", None)


def test_overlong_values_are_cut_to_the_columns(database: Database) -> None:
    """PostgreSQL refuses a value longer than its column; an AE title is 16 characters at most
    (PS3.5 6.2), a peer may still send odd ones."""
    AssociationRecorder(database, acceptor_host="h" * 300, acceptor_pid=7)(
        _ended(calling_ae="C" * 40, called_ae="D" * 40, peer_address="a" * 100))
    with database.read_session() as session:
        row = session.execute(select(DicomAssociation)).scalar_one()
    assert (row.calling_ae, row.called_ae) == ("C" * 16, "D" * 16)
    assert (len(row.peer_address or ""), len(row.acceptor_host), row.acceptor_pid) == (64, 255, 7)


@pytest.mark.parametrize(
    "changes",
    [
        {"started_at": STARTED.replace(tzinfo=None)},
        {"ended_at": STARTED - dt.timedelta(seconds=1)},
        {"instances_stored": -1},
    ],
)
def test_an_impossible_association_is_refused_when_built(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _ended(**changes)
