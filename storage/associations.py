"""The record of accepted DICOM associations (``dicom_association``, migration 0014).

Each acceptor process — ``pneumo serve`` and its extra ``[dicom] acceptor_processes`` — writes one
row per association it *accepted*, once, when the association has ended, in one short
transaction of its own (:class:`AssociationRecorder`). The processes share only the database, so
this is how ``/metrics`` of the ``serve`` process can count every association of the deployment
(:mod:`storage.telemetry`, :mod:`storage.metrics`), as it counts instances and results.

What a row holds is what an operator needs about an association, and nothing about the
patients whose images it carried: AE titles, the peer's address (not its ephemeral port), how it
ended, its times, how many instances it stored and had refused, TLS or not, and the acceptor
(host and pid). Rejected associations are not written: an attacker's flood of A-ASSOCIATE-RQs
must not turn into database writes; those are audited as throttled Security Alerts and counted
by ``pneumo_security_alerts_total``.

The caller (:mod:`dicom_node.server`) records best effort: the association is over by then, and
a database that is down costs a logged warning, never the association's own work.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

from storage.db import Database
from storage.models import DicomAssociation, DicomAssociationEnd

#: Column widths of ``dicom_association`` (an AE title is at most 16 characters, PS3.5 6.2).
_AE_LENGTH, _ADDRESS_LENGTH, _HOST_LENGTH = 16, 64, 255


@dataclass(frozen=True, slots=True)
class EndedAssociation:
    """An accepted association that has ended, as the DICOM node saw it."""

    calling_ae: str
    called_ae: str
    peer_address: str | None
    ended_by: DicomAssociationEnd
    started_at: dt.datetime
    ended_at: dt.datetime
    instances_stored: int = 0
    instances_refused: int = 0
    tls: bool = False

    def __post_init__(self) -> None:
        if self.started_at.tzinfo is None or self.ended_at.tzinfo is None:
            raise ValueError("started_at and ended_at must be timezone-aware")
        if self.ended_at < self.started_at:
            raise ValueError("ended_at is before started_at")
        if self.instances_stored < 0 or self.instances_refused < 0:
            raise ValueError("instance counts must not be negative")


class AssociationRecorder:
    """Writes :class:`EndedAssociation` rows for one acceptor process (*acceptor_host*, *acceptor_pid*,
    by default this process). Raises what the database raises; thread-safe (a session per call)."""

    def __init__(self, database: Database, *, acceptor_host: str, acceptor_pid: int | None = None) -> None:
        self._database = database
        self._host = acceptor_host[:_HOST_LENGTH]
        self._pid = acceptor_pid

    def __call__(self, ended: EndedAssociation) -> int:
        """Insert the row in one transaction; returns its id."""
        row = DicomAssociation(
            calling_ae=ended.calling_ae[:_AE_LENGTH],
            called_ae=ended.called_ae[:_AE_LENGTH],
            peer_address=ended.peer_address[:_ADDRESS_LENGTH] if ended.peer_address else None,
            ended_by=DicomAssociationEnd(ended.ended_by).value,
            started_at=ended.started_at,
            ended_at=ended.ended_at,
            instances_stored=ended.instances_stored,
            instances_refused=ended.instances_refused,
            tls=ended.tls,
            acceptor_host=self._host,
            acceptor_pid=self._pid if self._pid is not None else os.getpid(),
        )
        with self._database.session() as session:
            session.add(row)
            session.flush()
            return int(row.id)
