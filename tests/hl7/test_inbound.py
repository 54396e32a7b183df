"""hl7.inbound: orders and ADT in, one ACK out, behind a real MllpServer on 127.0.0.1.

The RIS is played by plain sockets (and :class:`MllpClient`), the database is the real one of the
``database`` fixture (SQLite and PostgreSQL). Every reply is read back with
:func:`hl7.messages.parse_ack`; an AA / AE / AR must echo the message's MSH-10 in MSA-2.

* ORM^O01 and OMI^O23: the ``imaging_order`` row, the inbound message log, the audit records
  (Import with the ACK code, Order Record), and AA only once the commit is visible to others;
  both arrival orders (order then study, study then order: the study's ``study-changed`` job is
  re-armed); XO updates and CA cancels the same row.
* A resent control id gets the byte-identical ACK and changes nothing (also two at once).
* Peers: unknown MSH-3/MSH-4 or the wrong host: AR, nothing stored, Security Alert.
* Bad messages (AE/AR with ERR, nothing stored) and framing (truncated, oversized, junk,
  pipelined, trickled).
* ADT^A08 (patient and orders), ADT^A40 (studies and orders move, studies re-published).
* The database down or failing at commit: no ACK, the connection closes, nothing half-stored;
  once it is back the resend is accepted exactly once. Refusals (AE/AR) still go out meanwhile.
* Values longer than their columns still get an answer on PostgreSQL (no poison message).
* A peer's ``host`` may be a host name (fails today: see the test's docstring).
* No PHI in any log line.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.engine import make_url

from audit.events import AuditSource
from audit.models import AuditRecord
from audit.store import verify_chain
from conf.settings import Hl7Peer, Hl7Settings
from hl7.inbound import InboundService
from hl7.messages import parse_ack
from hl7.mllp import ConnectionInfo, Frame, FrameDecoder, MllpClient, MllpServer, encode
from hl7.results_channel import _order as order_for_accession
from storage.db import Database
from storage.job_kinds import STUDY_CHANGED_JOB, study_changed_key
from storage.models import Hl7InboundMessage, ImagingOrder, Job, JobState, Patient, Study, utcnow
from tests.conftest import wait_until

HOST = "127.0.0.1"
SOURCE = AuditSource("PNEUMO@test")
IMPORT, ORDER_RECORD, PATIENT_RECORD, SECURITY_ALERT = "110107", "110109", "110110", "110113"

# The patient: none of these values may appear in a log line.
PATIENT_ID = "MRN-QX-90210"
FAMILY, GIVEN = "ZABRISKIE", "QUILLON"
NAME = f"{FAMILY}^{GIVEN}"
BIRTH_DATE = "19450317"
STUDY_UID = "1.2.826.0.1.3680043.8.498.4242"


# --------------------------------------------------------------------------- messages (as a RIS writes them)


def orm(
    control_id: str,
    *,
    control: str = "NW",
    placer: str = "PO-5001",
    filler: str = "FO-5001",
    accession: str = "ACC-5001",
    patient_id: str = PATIENT_ID,
    issuer: str = "HOSP",
    name: str = NAME,
    priority: str = "S",
    procedure: str = "36554-4^XR Chest Single view^LN",
    study_uid: str | None = STUDY_UID,
    sender: tuple[str, str] = ("RIS", "HOSP"),
    version: str = "2.3.1",
    message_type: str = "ORM^O01",
) -> str:
    """An IHE RAD-4 ORM^O01 v2.3.1: accession in OBR-18, Study Instance UID in ZDS-1."""
    segments = [
        f"MSH|^~\\&|{sender[0]}|{sender[1]}|PNEUMO|RAD|20261130080000||{message_type}|{control_id}|P|{version}",
        f"PID|1||{patient_id}^^^{issuer}^MR||{name}||{BIRTH_DATE}|F",
        "PV1|1|O",
        f"ORC|{control}|{placer}^HIS|{filler}^RIS||SC||1^^^20261130090000^^{priority}||20261130080000|||0101^KILDARE^JAMES^^^DR",
        f"OBR|1|{placer}^HIS|{filler}^RIS|{procedure}||||||||||||0101^KILDARE^JAMES^^^DR||{accession}|RP-1|SPS-1||||CR",
    ]
    if study_uid:
        segments.append(f"ZDS|{study_uid}^RIS^Application^DICOM")
    return "\r".join(segments) + "\r"


def omi(control_id: str, *, placer: str = "PO-6001", accession: str = "ACC-6001", study_uid: str = STUDY_UID,
        name: str = NAME) -> str:
    """An OMI^O23 v2.5.1 (IHE RAD-4, HL7 v2.5.1 option): accession and Study Instance UID in IPC."""
    return "\r".join([
        f"MSH|^~\\&|RIS|HOSP|PNEUMO|RAD|20261130080000||OMI^O23^OMI_O23|{control_id}|P|2.5.1",
        f"PID|1||{PATIENT_ID}^^^HOSP^MR||{name}||{BIRTH_DATE}|F",
        "PV1|1|E",
        f"ORC|NW|{placer}^HIS|FO-6001^RIS||SC|||||||0303^WELBY^MARCUS",
        "TQ1|1||||||20261130073000||A^ASAP^HL70485",
        f"OBR|1|{placer}^HIS|FO-6001^RIS|71045^XR CHEST 1 VIEW^C4||||||||||||0303^WELBY^MARCUS||||||||DX",
        f"IPC|{accession}^RIS|RP-2|{study_uid}|SPS-2|DX",
    ]) + "\r"


def adt_a08(control_id: str, *, patient_id: str = PATIENT_ID, issuer: str = "HOSP", name: str = NAME,
            birth_date: str = BIRTH_DATE, sex: str = "F") -> str:
    return "\r".join([
        f"MSH|^~\\&|RIS|HOSP|PNEUMO|RAD|20261130100000||ADT^A08^ADT_A01|{control_id}|P|2.5",
        "EVN|A08|20261130100000",
        f"PID|1||{patient_id}^^^{issuer}^MR||{name}||{birth_date}|{sex}",
        "PV1|1|O",
    ]) + "\r"


def adt_a40(control_id: str, *, surviving: str, prior: str, name: str = NAME) -> str:
    return "\r".join([
        f"MSH|^~\\&|RIS|HOSP|PNEUMO|RAD|20261130110000||ADT^A40^ADT_A39|{control_id}|P|2.5.1",
        "EVN|A40|20261130110000",
        f"PID|1||{surviving}^^^HOSP^MR||{name}||{BIRTH_DATE}|F",
        f"MRG|{prior}^^^HOSP^MR",
    ]) + "\r"


# --------------------------------------------------------------------------- the listener and the RIS side


@dataclass
class Listener:
    database: Database
    service: InboundService
    server: MllpServer
    #: For every AA that left: whether its message log row was visible to another connection then.
    committed_at_ack: list[bool] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    def send(self, message: str | bytes) -> bytes:
        """One message on its own connection, as the results channel's client sends (MLLP Release 2)."""
        return MllpClient().send(HOST, self.port, message, timeout=15)


@pytest.fixture
def listen(database: Database) -> Iterator[Callable[..., Listener]]:
    """Start an InboundService behind an MllpServer on 127.0.0.1:0 (stopped afterwards)."""
    started: list[MllpServer] = []

    def start(*, db: Database | None = None, peer_host: str | None = HOST, max_message_bytes: int = 2048,
              max_connections: int = 8) -> Listener:
        db = db or database
        settings = Hl7Settings(
            port=0, sending_application="PNEUMO", sending_facility="RAD",
            peers=[Hl7Peer(sending_application="RIS", sending_facility="HOSP", host=peer_host)],
            max_message_bytes=max_message_bytes, max_connections=max_connections,
        )
        service = InboundService(db, SOURCE, settings)
        listener: Listener

        def handler(payload: bytes, info: ConnectionInfo) -> bytes:
            reply = service.handle(payload, info)
            code, control_id, _ = parse_ack(reply)
            if code == "AA":  # the ACK leaves now: its commit must already be visible to any other connection
                with db.read_session() as session:
                    logged = session.execute(
                        select(func.count()).select_from(Hl7InboundMessage).where(Hl7InboundMessage.control_id == control_id)
                    ).scalar_one()
                listener.committed_at_ack.append(logged == 1)
            return reply

        server = MllpServer(HOST, 0, handler, on_frame_error=service.on_frame_error, max_message_bytes=max_message_bytes,
                            idle_timeout=15.0, max_connections=max_connections,
                            on_connection_refused=service.on_connection_refused)
        listener = Listener(db, service, server)
        server.start()
        started.append(server)
        return listener

    yield start
    for server in started:
        server.stop()


def connect(listener: Listener) -> socket.socket:
    sock = socket.create_connection((HOST, listener.port), timeout=15)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive(sock: socket.socket, count: int, *, until_closed: bool = False) -> tuple[list[bytes], bool]:
    """Read *count* reply blocks (then, with *until_closed*, on until EOF): (payloads, whether the peer closed)."""
    decoder = FrameDecoder(1 << 20)
    replies: list[bytes] = []
    while len(replies) < count or until_closed:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return replies, True
        if not data:
            return replies, True
        for item in decoder.feed(data):
            assert isinstance(item, Frame), item
            replies.append(item.payload)
    return replies, False


def exchange(listener: Listener, *messages: str | bytes) -> list[bytes]:
    """All *messages* in one write on one connection; their replies, in order."""
    with connect(listener) as sock:
        sock.sendall(b"".join(encode(m) for m in messages))
        replies, closed = receive(sock, len(messages))
    assert len(replies) == len(messages) and not closed
    return replies


def check_ack(reply: bytes, code: str, control_id: str | None, *, error: int | None = None) -> None:
    """MSA-1 and MSA-2 as parse_ack reads them; AE/AR carry an ERR segment (with the table 0357 code)."""
    got, echoed, _text = parse_ack(reply)
    assert (got, echoed) == (code, control_id)
    segments = reply.decode("utf-8").rstrip("\r").split("\r")
    assert segments[0].startswith("MSH|^~\\&|PNEUMO|RAD|")
    assert [s[:3] for s in segments] == (["MSH", "MSA"] if code == "AA" else ["MSH", "MSA", "ERR"])
    if error is not None:
        found = re.search(r"(\d{3})[\^&][^|^&]*[\^&]HL70357", segments[2])
        assert found is not None and int(found.group(1)) == error, segments[2]


# --------------------------------------------------------------------------- database helpers


def all_rows(database: Database, model: Any) -> list[Any]:
    with database.read_session() as session:
        return list(session.execute(select(model).order_by(model.id)).scalars())


def audit_events(database: Database, code: str) -> list[dict[str, Any]]:
    with database.read_session() as session:
        records = session.execute(select(AuditRecord).where(AuditRecord.event_id == code).order_by(AuditRecord.seq)).scalars()
        return [record.event for record in records]


def ack_codes_audited(database: Database) -> list[str]:
    return [event["objects"][0]["details"]["AckCode"] for event in audit_events(database, IMPORT)]


def add_study(database: Database, study_uid: str, accession: str, *, patient_id: str = PATIENT_ID,
              name: str | None = NAME, birth_date: str | None = BIRTH_DATE, sex: str | None = "F") -> tuple[int, int]:
    """A patient (found or added) and a study, as the Storage SCP indexes them: (patient pk, study pk)."""
    with database.session() as session:
        patient = session.execute(
            select(Patient).where(Patient.patient_id == patient_id, Patient.issuer == "HOSP")
        ).scalar_one_or_none()
        if patient is None:
            patient = Patient(patient_id=patient_id, issuer="HOSP", name=name, birth_date=birth_date, sex=sex)
            session.add(patient)
            session.flush()
        study = Study(study_instance_uid=study_uid, patient_pk=patient.id, study_date="20261130", study_time="0900",
                      accession_number=accession)
        session.add(study)
        session.flush()
        return patient.id, study.id


def study_changed_jobs(database: Database) -> dict[str, Job]:
    with database.read_session() as session:
        return {job.dedup_key: job for job in session.execute(select(Job).where(Job.kind == STUDY_CHANGED_JOB)).scalars()}


def assert_nothing_stored(database: Database) -> None:
    assert all_rows(database, ImagingOrder) == []
    assert all_rows(database, Hl7InboundMessage) == []
    assert audit_events(database, ORDER_RECORD) == [] and audit_events(database, PATIENT_RECORD) == []
    assert study_changed_jobs(database) == {}


# --------------------------------------------------------------------------- orders


ORDER_CASES: list[tuple[str, str, dict[str, Any]]] = [
    (
        "ORM^O01 v2.3.1",
        orm("ORM-0001"),
        {
            "placer_order_number": "PO-5001", "placer_namespace": "HIS", "filler_order_number": "FO-5001",
            "accession_number": "ACC-5001", "order_control": "NW", "status": "active",
            "patient_id": PATIENT_ID, "patient_issuer": "HOSP", "patient_name": NAME, "birth_date": BIRTH_DATE, "sex": "F",
            "procedure_code": "36554-4", "procedure_system": "LN", "procedure_text": "XR Chest Single view",
            "ordering_provider": "KILDARE^JAMES^^DR", "priority": "S", "study_instance_uid": STUDY_UID,
            "sending_application": "RIS", "sending_facility": "HOSP", "message_type": "ORM^O01",
        },
    ),
    (
        "OMI^O23 v2.5.1",
        omi("OMI-0001"),
        {
            "placer_order_number": "PO-6001", "placer_namespace": "HIS", "filler_order_number": "FO-6001",
            "accession_number": "ACC-6001", "order_control": "NW", "status": "active",
            "patient_id": PATIENT_ID, "patient_issuer": "HOSP", "patient_name": NAME, "birth_date": BIRTH_DATE, "sex": "F",
            "procedure_code": "71045", "procedure_system": "C4", "procedure_text": "XR CHEST 1 VIEW",
            "ordering_provider": "WELBY^MARCUS", "priority": "A", "study_instance_uid": STUDY_UID,
            "sending_application": "RIS", "sending_facility": "HOSP", "message_type": "OMI^O23",
        },
    ),
]


@pytest.mark.parametrize(("message", "expected"), [c[1:] for c in ORDER_CASES], ids=[c[0] for c in ORDER_CASES])
def test_order_is_stored_then_acknowledged(database: Database, listen: Callable[..., Listener], message: str,
                                           expected: dict[str, Any]) -> None:
    listener = listen()
    control_id = message.split("|", 10)[9]
    before = utcnow()
    reply = listener.send(message)
    check_ack(reply, "AA", control_id)
    assert listener.committed_at_ack == [True]  # AA only once the order was committed

    [order] = all_rows(database, ImagingOrder)
    assert {name: getattr(order, name) for name in expected} == expected
    assert before <= order.received_at <= utcnow()

    [logged] = all_rows(database, Hl7InboundMessage)
    assert (logged.sending_application, logged.sending_facility, logged.control_id) == ("RIS", "HOSP", control_id)
    assert (logged.message_type, logged.ack_code, logged.ack.encode()) == (expected["message_type"], "AA", reply)

    [received] = audit_events(database, IMPORT)
    assert received["event_id"]["code"] == IMPORT and received["outcome"] == 0
    assert received["objects"][0]["object_id"] == control_id
    assert received["objects"][0]["details"] == {"MessageType": expected["message_type"], "AckCode": "AA"}
    sender = received["participants"][0]
    assert (sender["user_id"], sender["network_access_point_id"]) == ("RIS@HOSP", HOST)
    [recorded] = audit_events(database, ORDER_RECORD)
    assert recorded["event_id"]["code"] == ORDER_RECORD and recorded["action"] == "C" and recorded["outcome"] == 0
    patient, accession = recorded["objects"]
    assert (patient["object_id"], patient["role"], patient["name"]) == (PATIENT_ID, 1, NAME)
    assert (accession["object_id"], accession["details"]["OrderControl"]) == (expected["accession_number"], "NW")
    assert audit_events(database, SECURITY_ALERT) == []
    assert study_changed_jobs(database) == {}  # no study has this accession yet


def test_order_first_then_the_study_finds_it_by_accession(database: Database, listen: Callable[..., Listener]) -> None:
    listener = listen()
    check_ack(listener.send(orm("ORM-0101", accession="ACC-0101", placer="PO-0101")), "AA", "ORM-0101")
    check_ack(listener.send(orm("ORM-0102", accession="ACC-0102", placer="PO-0102")), "AA", "ORM-0102")
    assert study_changed_jobs(database) == {}

    _, study_pk = add_study(database, STUDY_UID, "ACC-0101")  # the images arrive later
    with database.read_session() as session:
        study = session.get(Study, study_pk)
        assert study is not None
        found = order_for_accession(session, study.accession_number)  # what the ORU^R01 is built from
    assert found is not None
    assert (found.placer_order_number, found.accession_number, found.patient_id) == ("PO-0101", "ACC-0101", PATIENT_ID)


def test_study_first_then_the_order_rearms_its_study_changed_job(database: Database,
                                                                 listen: Callable[..., Listener]) -> None:
    listener = listen()
    _, study_pk = add_study(database, STUDY_UID, "ACC-0201")
    _, other_pk = add_study(database, STUDY_UID + ".2", "ACC-0202")
    key = study_changed_key(STUDY_UID)
    with database.session() as session:  # the study was published before the order came: its job is done
        session.add(Job(kind=STUDY_CHANGED_JOB, dedup_key=key, payload={"study_pk": study_pk}, state=JobState.DONE,
                        attempts=1, run_after=utcnow() - dt.timedelta(hours=1)))

    before = utcnow()
    check_ack(listener.send(orm("ORM-0201", accession="ACC-0201")), "AA", "ORM-0201")
    jobs = study_changed_jobs(database)
    assert list(jobs) == [key]  # the study with this accession only, once
    job = jobs[key]
    assert (job.kind, job.state, job.attempts, job.payload) == (STUDY_CHANGED_JOB, JobState.PENDING, 0, {"study_pk": study_pk})
    assert job.run_after >= before

    # A study that had no job at all gets one.
    check_ack(listener.send(orm("ORM-0202", accession="ACC-0202", placer="PO-0202")), "AA", "ORM-0202")
    other = study_changed_jobs(database)[study_changed_key(STUDY_UID + ".2")]
    assert (other.state, other.payload) == (JobState.PENDING, {"study_pk": other_pk})


def test_order_update_and_cancel_change_the_same_row(database: Database, listen: Callable[..., Listener]) -> None:
    listener = listen()
    check_ack(listener.send(orm("ORM-0301")), "AA", "ORM-0301")
    [first] = all_rows(database, ImagingOrder)

    check_ack(listener.send(orm("ORM-0302", control="XO", priority="R", procedure="71046^XR CHEST 2 VIEWS^C4")), "AA",
              "ORM-0302")
    [changed] = all_rows(database, ImagingOrder)
    assert changed.id == first.id
    assert (changed.order_control, changed.status, changed.priority) == ("XO", "active", "R")
    assert (changed.procedure_code, changed.procedure_system, changed.procedure_text) == ("71046", "C4", "XR CHEST 2 VIEWS")
    assert changed.updated_at >= first.updated_at

    check_ack(listener.send(orm("ORM-0303", control="CA")), "AA", "ORM-0303")
    [cancelled] = all_rows(database, ImagingOrder)
    assert (cancelled.id, cancelled.order_control, cancelled.status) == (first.id, "CA", "cancelled")
    assert [e["objects"][1]["details"]["OrderControl"] for e in audit_events(database, ORDER_RECORD)] == ["NW", "XO", "CA"]
    assert [row.control_id for row in all_rows(database, Hl7InboundMessage)] == ["ORM-0301", "ORM-0302", "ORM-0303"]


# --------------------------------------------------------------------------- resent messages


def test_resent_control_id_gets_the_same_ack_and_changes_nothing(database: Database,
                                                                 listen: Callable[..., Listener]) -> None:
    listener = listen()
    message = orm("ORM-0401")
    first = listener.send(message)
    check_ack(first, "AA", "ORM-0401")
    time.sleep(0.01)  # a rebuilt ACK would carry another MSH-7 / MSH-10
    assert listener.send(message) == first  # a new connection, as after a lost ACK
    with connect(listener) as sock:  # and twice more on one connection
        sock.sendall(encode(message) * 2)
        replies, _ = receive(sock, 2)
    assert replies == [first, first]
    # The same control id with other content is still the message already acknowledged.
    assert listener.send(orm("ORM-0401", control="CA", priority="R")) == first

    [order] = all_rows(database, ImagingOrder)
    assert (order.order_control, order.status, order.priority) == ("NW", "active", "S")
    assert len(all_rows(database, Hl7InboundMessage)) == 1
    assert len(audit_events(database, ORDER_RECORD)) == 1
    assert ack_codes_audited(database) == ["AA"]


def test_the_same_message_on_two_connections_at_once(database: Database, listen: Callable[..., Listener]) -> None:
    listener = listen()
    message = orm("ORM-0501")
    barrier = threading.Barrier(3)
    replies: list[bytes] = []

    def send() -> None:
        barrier.wait()
        replies.append(listener.send(message))

    threads = [threading.Thread(target=send) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(replies) == 3 and len(set(replies)) == 1
    check_ack(replies[0], "AA", "ORM-0501")
    assert len(all_rows(database, ImagingOrder)) == 1
    assert len(all_rows(database, Hl7InboundMessage)) == 1
    assert len(audit_events(database, ORDER_RECORD)) == 1


def queue_holds(commits: Any, count: int) -> bool:
    return len(commits._queue) == count  # noqa: SLF001 - the queue depth shows who waits for the batch


def send_behind_a_held_commit(database: Database, listener: Listener, messages: list[str]) -> tuple[list[bytes], int]:
    """Group commit, made deterministic: a first order leads and its transaction waits (the test
    holds the audit chain head) while *messages* queue behind it, each on its own connection and
    in this order; then everything goes on. Returns the replies to *messages* (in order) and how
    many transactions committed after the hold (the first order's, then the batches)."""
    commits = listener.service._commits  # noqa: SLF001 - who leads and who waits shows the batching
    committed: list[int] = []
    replies: dict[int, bytes] = {}

    def sender(index: int, message: str) -> threading.Thread:
        def send() -> None:
            replies[index] = listener.send(message)
        return threading.Thread(target=send)

    event.listen(database.engine, "commit", lambda connection: committed.append(1))
    with database.session() as holder:  # the chain head locked: the first order's transaction cannot finish
        holder.execute(text("UPDATE audit_chain_head SET last_seq = last_seq WHERE id = 1"))
        first = sender(-1, orm("GC-LEAD", placer="GP-LEAD", accession="GA-LEAD"))
        first.start()
        wait_until(lambda: commits._leading and not commits._queue, 15, "the first order to lead")  # noqa: SLF001
        threads = [sender(index, message) for index, message in enumerate(messages)]
        for queued, thread in enumerate(threads, start=1):
            thread.start()
            wait_until(partial(queue_holds, commits, queued), 15, "the next message to queue")
        assert replies == {}, "an ACK left before its commit"
        committed.clear()
    for thread in [first, *threads]:
        thread.join(30)
    check_ack(replies[-1], "AA", "GC-LEAD")
    return [replies[index] for index in range(len(messages))], len(committed) - 1  # not the holder's


def test_orders_arriving_together_share_one_commit_and_each_is_acked_after_it(
        database: Database, listen: Callable[..., Listener]) -> None:
    """Seven orders (one of them twice) queued behind a commit are stored in ONE transaction, each
    answered AA only after it; the copy gets the same ACK and no second row; the chain is whole."""
    listener = listen()
    messages = [orm(f"GC-{n}", placer=f"GP-{n}", accession=f"GA-{n}") for n in range(1, 7)]
    replies, transactions = send_behind_a_held_commit(database, listener, [*messages, messages[2]])
    assert transactions == 2, "the first order's transaction, then ONE for the seven queued"
    for n, reply in enumerate(replies[:6], start=1):
        check_ack(reply, "AA", f"GC-{n}")
    assert replies[6] == replies[2]
    assert listener.committed_at_ack == [True] * 8
    placers = sorted(order.placer_order_number for order in all_rows(database, ImagingOrder))
    assert placers == sorted(["GP-LEAD", *(f"GP-{n}" for n in range(1, 7))])
    assert len(all_rows(database, Hl7InboundMessage)) == 7
    assert len(audit_events(database, ORDER_RECORD)) == 7 and ack_codes_audited(database) == ["AA"] * 7
    with database.read_session() as session:
        assert verify_chain(session).ok


def test_a_batch_applies_orders_and_adt_in_arrival_order(database: Database, listen: Callable[..., Listener]) -> None:
    """One batch: a new order, an ADT^A08 renaming its patient, a change (XO) of the same order
    without a filler number, a second order. The result is what one-by-one would give: the XO wins
    but keeps the filler number, the ADT renamed the first order, the second order (after the ADT)
    has the name it carries itself."""
    listener = listen()
    replies, transactions = send_behind_a_held_commit(database, listener, [
        orm("MX-1", placer="PX-1", filler="FX-1", accession="AX-1", priority="R"),
        adt_a08("MX-2", name="ZABRISKIE^QUINCEY"),
        orm("MX-3", control="XO", placer="PX-1", filler="", accession="AX-1", priority="S"),
        orm("MX-4", placer="PX-2", filler="FX-2", accession="AX-2"),
    ])
    assert transactions == 2
    for n, reply in enumerate(replies, start=1):
        check_ack(reply, "AA", f"MX-{n}")
    orders = {order.placer_order_number: order for order in all_rows(database, ImagingOrder)}
    first, second = orders["PX-1"], orders["PX-2"]
    assert (first.order_control, first.priority, first.filler_order_number) == ("XO", "S", "FX-1")
    assert first.patient_name == NAME  # the XO came after the ADT and carries the old name again
    assert second.patient_name == NAME and second.filler_order_number == "FX-2"
    assert len(audit_events(database, PATIENT_RECORD)) == 1 and len(audit_events(database, ORDER_RECORD)) == 4


# --------------------------------------------------------------------------- peers


@pytest.mark.parametrize("sender", [("EVIL", "HOSP"), ("RIS", "ELSEWHERE")], ids=["application", "facility"])
def test_unknown_sender_is_refused_and_alerted(database: Database, listen: Callable[..., Listener],
                                               sender: tuple[str, str]) -> None:
    listener = listen()
    reply = listener.send(orm("ORM-0601", sender=sender))
    check_ack(reply, "AR", "ORM-0601", error=207)
    assert parse_ack(reply)[2] is not None
    assert_nothing_stored(database)
    [alert] = audit_events(database, SECURITY_ALERT)
    assert alert["outcome"] == 4 and alert["event_types"][0]["code"] == "110126"  # Node Authentication
    offender = alert["participants"][1]
    assert (offender["user_id"], offender["network_access_point_id"]) == (f"{sender[0]}@{sender[1]}", HOST)
    assert ack_codes_audited(database) == ["AR"]
    # The configured peer is still served.
    check_ack(listener.send(orm("ORM-0602")), "AA", "ORM-0602")


def test_known_peer_from_another_host_is_refused(database: Database, listen: Callable[..., Listener]) -> None:
    listener = listen(peer_host="10.9.9.9")
    check_ack(listener.send(orm("ORM-0701")), "AR", "ORM-0701", error=207)
    assert_nothing_stored(database)
    [alert] = audit_events(database, SECURITY_ALERT)
    assert alert["participants"][1]["network_access_point_id"] == HOST


def test_peer_host_may_be_a_host_name(database: Database, listen: Callable[..., Listener]) -> None:
    """Hl7Peer.host is documented as "Host name or IP it connects from" (as [[dicom.peers]] host,
    which dicom_node.peers resolves): a peer configured as "localhost" connects from 127.0.0.1."""
    listener = listen(peer_host="localhost")
    check_ack(listener.send(orm("ORM-0801")), "AA", "ORM-0801")


# --------------------------------------------------------------------------- bad messages and framing


def _without(message: str, segment_id: str) -> str:
    return "\r".join(line for line in message.split("\r") if not line.startswith(segment_id + "|"))


BAD_MESSAGES: list[tuple[str, str | bytes, str, str | None, int]] = [
    # (what, message, ACK code, echoed MSH-10, table 0357 code)
    ("bad MSH encoding characters", orm("BAD-01").replace("MSH|^~\\&|", "MSH|^^\\&|", 1), "AR", "BAD-01", 102),
    ("no MSH", "PID|1||" + PATIENT_ID + "\r" + orm("BAD-02"), "AR", None, 100),
    ("garbage bytes", bytes(range(0x80, 0x100)) + b"\x00\x01\x02 not HL7", "AR", None, 100),
    ("missing PID", _without(orm("BAD-03"), "PID"), "AE", "BAD-03", 100),
    ("unsupported version", orm("BAD-04", version="2.6"), "AR", "BAD-04", 203),
    ("unsupported message type", orm("BAD-05", message_type="ORU^R01"), "AR", "BAD-05", 200),
    ("unsupported event", orm("BAD-06", message_type="ADT^A01"), "AR", "BAD-06", 201),
    ("missing accession", orm("BAD-07", accession=""), "AE", "BAD-07", 101),
    ("OMI without IPC-1", omi("BAD-08", accession=""), "AE", "BAD-08", 101),
]


def test_bad_messages_are_answered_with_an_error_and_store_nothing(database: Database,
                                                                   listen: Callable[..., Listener]) -> None:
    listener = listen()
    replies = exchange(listener, *(case[1] for case in BAD_MESSAGES))  # pipelined on one connection
    for (what, _message, code, control_id, error), reply in zip(BAD_MESSAGES, replies, strict=True):
        try:
            check_ack(reply, code, control_id, error=error)
        except AssertionError as failure:
            raise AssertionError(f"{what}: {failure}") from None
    assert_nothing_stored(database)
    assert audit_events(database, SECURITY_ALERT) == []
    assert ack_codes_audited(database) == [case[2] for case in BAD_MESSAGES]  # every refusal is audited
    # The connection was not harmed: a good message after them is accepted.
    check_ack(exchange(listener, orm("GOOD-01"))[0], "AA", "GOOD-01")


def test_truncated_frame_then_a_good_one_on_the_same_connection(database: Database,
                                                                listen: Callable[..., Listener]) -> None:
    listener = listen()
    good = orm("ORM-0901")
    with connect(listener) as sock:
        sock.sendall(b"\x0b" + orm("ORM-0900").encode()[:150])  # the sender gave up mid-block...
        time.sleep(0.05)
        sock.sendall(encode(good))  # ...and starts over
        replies, closed = receive(sock, 2)
    assert not closed
    check_ack(replies[0], "AR", None, error=207)
    check_ack(replies[1], "AA", "ORM-0901")
    [order] = all_rows(database, ImagingOrder)
    assert [row.control_id for row in all_rows(database, Hl7InboundMessage)] == ["ORM-0901"]
    assert ack_codes_audited(database) == ["AR", "AA"]


def test_junk_before_a_block_is_refused_then_the_block_accepted(database: Database,
                                                                listen: Callable[..., Listener]) -> None:
    listener = listen()
    with connect(listener) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + encode(orm("ORM-0951")))
        replies, closed = receive(sock, 2)
    assert not closed
    check_ack(replies[0], "AR", None, error=207)
    check_ack(replies[1], "AA", "ORM-0951")
    assert len(all_rows(database, ImagingOrder)) == 1


def test_oversized_frame_is_refused_and_the_connection_closed(database: Database,
                                                              listen: Callable[..., Listener]) -> None:
    listener = listen(max_message_bytes=2048)
    huge = orm("ORM-1001") + "ZZZ|" + "x" * 4000 + "\r"
    with connect(listener) as sock:
        sock.sendall(encode(huge) + encode(orm("ORM-1002")))
        replies, closed = receive(sock, 1, until_closed=True)
    assert closed and len(replies) == 1  # the message after it is never read
    check_ack(replies[0], "AR", None, error=207)
    assert_nothing_stored(database)
    assert ack_codes_audited(database) == ["AR"]
    [alert] = audit_events(database, SECURITY_ALERT)
    assert alert["outcome_description"] == "HL7 max_message_bytes limit: an MLLP frame over 2048 bytes"
    # Again from the same address within the minute: refused the same way, no second alert.
    with connect(listener) as sock:
        sock.sendall(encode(huge))
        replies, closed = receive(sock, 1, until_closed=True)
    check_ack(replies[0], "AR", None, error=207)
    assert len(audit_events(database, SECURITY_ALERT)) == 1


def test_connections_over_the_limit_are_closed_and_alerted_once(database: Database,
                                                               listen: Callable[..., Listener]) -> None:
    listener = listen(max_connections=1)
    with connect(listener) as held:
        held.sendall(encode(orm("HELD-1")))
        check_ack(receive(held, 1)[0][0], "AA", "HELD-1")
        for _ in range(3):
            with connect(listener) as refused:
                refused.settimeout(5)
                assert refused.recv(16) == b""  # closed at once, no ACK, no HL7 read
        wait_until(lambda: audit_events(database, SECURITY_ALERT), what="the Security Alert")
    [alert] = audit_events(database, SECURITY_ALERT)
    assert alert["outcome_description"] == "HL7 max_connections limit: more than 1 connections"


def test_several_messages_in_one_write_are_answered_in_order(database: Database,
                                                             listen: Callable[..., Listener]) -> None:
    listener = listen()
    add_study(database, STUDY_UID, "ACC-6001")
    messages = [orm("PIPE-1", accession="ACC-1101", placer="PO-1101"), omi("PIPE-2"), adt_a08("PIPE-3", sex="O"),
                orm("PIPE-4", accession="", placer="PO-1104"), orm("PIPE-5", accession="ACC-1105", placer="PO-1105")]
    replies = exchange(listener, *messages)
    for reply, control_id in zip(replies, ["PIPE-1", "PIPE-2", "PIPE-3"], strict=False):
        check_ack(reply, "AA", control_id)
    check_ack(replies[3], "AE", "PIPE-4", error=101)
    check_ack(replies[4], "AA", "PIPE-5")
    assert [o.accession_number for o in all_rows(database, ImagingOrder)] == ["ACC-1101", "ACC-6001", "ACC-1105"]
    assert [p.sex for p in all_rows(database, Patient)] == ["O"]
    assert listener.committed_at_ack == [True] * 4


def test_one_message_over_many_small_writes(database: Database, listen: Callable[..., Listener]) -> None:
    listener = listen()
    block = encode(omi("TRICKLE-1"))
    with connect(listener) as sock:
        for start in range(0, len(block), 16):
            sock.sendall(block[start : start + 16])
            time.sleep(0.001)
        replies, closed = receive(sock, 1)
    assert not closed
    check_ack(replies[0], "AA", "TRICKLE-1")
    [order] = all_rows(database, ImagingOrder)
    assert (order.accession_number, order.study_instance_uid) == ("ACC-6001", STUDY_UID)


# --------------------------------------------------------------------------- ADT


def test_adt_a08_updates_the_patient_and_its_orders(database: Database, listen: Callable[..., Listener]) -> None:
    listener = listen()
    patient_pk, study_pk = add_study(database, STUDY_UID, "ACC-1201", name="ZABRISKY^Q", birth_date=None, sex="O")
    add_study(database, STUDY_UID + ".9", "ACC-1209", patient_id="MRN-OTHER", name="OTHER^PERSON")
    check_ack(listener.send(orm("ORM-1201", accession="ACC-1201", name="ZABRISKY^Q")), "AA", "ORM-1201")
    check_ack(listener.send(orm("ORM-1209", accession="ACC-1209", placer="PO-1209", patient_id="MRN-OTHER",
                                name="OTHER^PERSON")), "AA", "ORM-1209")
    with database.session() as session:  # the order's re-publication has run since
        for job in session.execute(select(Job)).scalars():
            job.state = JobState.DONE

    check_ack(listener.send(adt_a08("ADT-1201", name=f"{NAME}^M", birth_date="19450318", sex="F")), "AA", "ADT-1201")
    with database.read_session() as session:
        patient = session.get(Patient, patient_pk)
        assert patient is not None
        assert (patient.name, patient.birth_date, patient.sex) == (f"{NAME}^M", "19450318", "F")
        other = session.execute(select(Patient).where(Patient.patient_id == "MRN-OTHER")).scalar_one()
        assert other.name == "OTHER^PERSON"
    mine, theirs = all_rows(database, ImagingOrder)
    assert (mine.patient_name, mine.birth_date, mine.sex, mine.patient_issuer) == (f"{NAME}^M", "19450318", "F", "HOSP")
    assert (theirs.patient_name, theirs.patient_id) == ("OTHER^PERSON", "MRN-OTHER")
    jobs = study_changed_jobs(database)
    assert jobs[study_changed_key(STUDY_UID)].state == JobState.PENDING  # re-published
    assert jobs[study_changed_key(STUDY_UID)].payload == {"study_pk": study_pk}
    assert jobs[study_changed_key(STUDY_UID + ".9")].state == JobState.DONE  # not this patient's
    [record] = audit_events(database, PATIENT_RECORD)
    assert (record["action"], record["objects"][0]["object_id"]) == ("U", PATIENT_ID)


def test_adt_without_an_assigning_authority_keeps_the_orders_issuer(database: Database,
                                                                    listen: Callable[..., Listener]) -> None:
    """An ADT^A08/A31 whose PID-3 has no CX.4 (common from MPIs) updates the name; an absent
    value erases nothing (the rule _refresh_demographics follows for the patient row)."""
    listener = listen()
    check_ack(listener.send(orm("ORM-1301", name="ZABRISKY^Q")), "AA", "ORM-1301")
    check_ack(listener.send(adt_a08("ADT-1301", issuer="")), "AA", "ADT-1301")
    [order] = all_rows(database, ImagingOrder)
    assert (order.patient_id, order.patient_name) == (PATIENT_ID, NAME)
    assert order.patient_issuer == "HOSP"


def test_adt_a40_moves_the_prior_patients_studies_and_orders(database: Database,
                                                             listen: Callable[..., Listener]) -> None:
    listener = listen()
    prior_pk, moved_a = add_study(database, STUDY_UID + ".1", "ACC-1401", patient_id="MRN-PRIOR", name="ZABRISKY^Q")
    _, moved_b = add_study(database, STUDY_UID + ".2", "ACC-1402", patient_id="MRN-PRIOR")
    surviving_pk, kept = add_study(database, STUDY_UID + ".3", "ACC-1403", patient_id=PATIENT_ID, name="OLD^NAME")
    _, unrelated = add_study(database, STUDY_UID + ".4", "ACC-1404", patient_id="MRN-OTHER")
    check_ack(listener.send(orm("ORM-1401", accession="ACC-1401", patient_id="MRN-PRIOR", name="ZABRISKY^Q")), "AA",
              "ORM-1401")
    with database.session() as session:
        for job in session.execute(select(Job)).scalars():
            job.state = JobState.DONE

    check_ack(listener.send(adt_a40("ADT-1401", surviving=PATIENT_ID, prior="MRN-PRIOR")), "AA", "ADT-1401")
    with database.read_session() as session:
        owners = dict(session.execute(select(Study.id, Study.patient_pk)).all())
        surviving = session.get(Patient, surviving_pk)
        prior = session.get(Patient, prior_pk)
    assert owners[moved_a] == owners[moved_b] == owners[kept] == surviving_pk
    assert owners[unrelated] not in (surviving_pk, prior_pk)
    assert prior is not None  # kept, with no studies: the received files still carry its id
    assert surviving is not None and (surviving.name, surviving.birth_date) == (NAME, BIRTH_DATE)
    [order] = all_rows(database, ImagingOrder)
    assert (order.patient_id, order.patient_issuer, order.patient_name) == (PATIENT_ID, "HOSP", NAME)
    jobs = study_changed_jobs(database)
    for uid, pk in ((STUDY_UID + ".1", moved_a), (STUDY_UID + ".2", moved_b)):
        assert (jobs[study_changed_key(uid)].state, jobs[study_changed_key(uid)].payload) == (JobState.PENDING, {"study_pk": pk})
    assert study_changed_key(STUDY_UID + ".4") not in jobs
    [record] = audit_events(database, PATIENT_RECORD)
    assert record["event_id"]["code"] == PATIENT_RECORD and record["objects"][0]["object_id"] == PATIENT_ID


def test_adt_a40_to_an_unknown_patient_creates_it(database: Database, listen: Callable[..., Listener]) -> None:
    listener = listen()
    prior_pk, study_pk = add_study(database, STUDY_UID, "ACC-1501", patient_id="MRN-PRIOR")
    check_ack(listener.send(adt_a40("ADT-1501", surviving=PATIENT_ID, prior="MRN-PRIOR")), "AA", "ADT-1501")
    with database.read_session() as session:
        surviving = session.execute(select(Patient).where(Patient.patient_id == PATIENT_ID)).scalar_one()
        study = session.get(Study, study_pk)
    assert study is not None and study.patient_pk == surviving.id != prior_pk
    assert (surviving.issuer, surviving.name, surviving.birth_date, surviving.sex) == ("HOSP", NAME, BIRTH_DATE, "F")
    assert study_changed_jobs(database)[study_changed_key(STUDY_UID)].state == JobState.PENDING


# --------------------------------------------------------------------------- the database down


class TcpProxy:
    """127.0.0.1:<port> forwarded to PostgreSQL: :meth:`down` resets every connection and refuses
    new ones (a server crash or a network cut, as the client sees it); :meth:`up` serves again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def up(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(32)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._stop.clear()
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def down(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while not self._stop.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                client.settimeout(None)
                upstream = socket.create_connection(self.target)
                with self._lock:
                    self._sockets += [client, upstream]
                for source, sink in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@dataclass
class Outage:
    """Takes the listener's database away and brings it back, the way each backend really fails."""

    database: Database
    down: Callable[[], None]
    up: Callable[[], None]


@pytest.fixture
def outage(database: Database, tmp_path: Path) -> Iterator[Outage]:
    if database.is_sqlite:
        # SQLite: the database file is unreadable (replaced by another file: a botched restore, a
        # full disk's truncated copy); back: the real file again. Every pooled connection is
        # closed first so that each one re-opens the file.
        path = Path(str(database.url.database))
        aside = tmp_path / "aside"
        aside.mkdir()

        def sqlite_down() -> None:
            database.dispose()
            for name in (path.name, path.name + "-wal", path.name + "-shm"):
                if (path.parent / name).exists():
                    (path.parent / name).replace(aside / name)
            path.write_bytes(b"this is not an SQLite database\n" * 256)

        def sqlite_up() -> None:
            database.dispose()
            for moved in aside.iterdir():
                moved.replace(path.parent / moved.name)

        yield Outage(database, sqlite_down, sqlite_up)
        return
    # PostgreSQL: the gateway reaches the server through a TCP proxy that can be cut.
    url = database.url
    proxy = TcpProxy((url.host or HOST, url.port or 5432))
    proxy.up()
    proxied = Database(make_url(url.render_as_string(hide_password=False)).set(host=HOST, port=proxy.port)
                       .render_as_string(hide_password=False))

    def pg_down() -> None:
        proxy.down()

    yield Outage(proxied, pg_down, proxy.up)
    proxied.dispose()
    proxy.down()


def test_database_down_no_ack_then_the_resend_is_accepted_once(database: Database, listen: Callable[..., Listener],
                                                               outage: Outage) -> None:
    listener = listen(db=outage.database)
    check_ack(listener.send(orm("ORM-1600", placer="PO-1600", accession="ACC-1600")), "AA", "ORM-1600")  # connected
    message = orm("ORM-1601")

    outage.down()
    with structlog.testing.capture_logs() as lines, connect(listener) as sock:
        sock.sendall(encode(message))
        replies, closed = receive(sock, 1, until_closed=True)
    assert (replies, closed) == ([], True)  # no ACK at all: the sender keeps the message and resends
    failed = [line for line in lines if line["event"] == "hl7.handler_failed"]
    assert [line["error"] for line in failed] in (["DatabaseError"], ["OperationalError"])  # the database, nothing else
    assert not any(value in repr(lines) for value in (PATIENT_ID, FAMILY, GIVEN, BIRTH_DATE))

    outage.up()
    first = listener.send(message)
    check_ack(first, "AA", "ORM-1601")
    assert listener.send(message) == first  # once more: recognised, not applied twice
    assert [o.placer_order_number for o in all_rows(database, ImagingOrder)] == ["PO-1600", "PO-5001"]
    assert [m.control_id for m in all_rows(database, Hl7InboundMessage)] == ["ORM-1600", "ORM-1601"]
    assert len(audit_events(database, ORDER_RECORD)) == 2
    assert ack_codes_audited(database) == ["AA", "AA"]


def test_commit_failure_sends_no_ack_and_stores_nothing(database: Database, listen: Callable[..., Listener]) -> None:
    """The transaction is complete and the commit fails (PostgreSQL: the server ends the session at
    that moment; SQLite: an I/O error is injected): no AA may have left, no row may be left."""
    listener = listen()
    armed = threading.Event()
    admin = None if database.is_sqlite else create_engine(database.url)

    def fail_commit(connection: Any) -> None:
        if not armed.is_set():
            return
        armed.clear()
        if admin is None:
            raise sqlite3.OperationalError("disk I/O error")
        pid = connection.connection.dbapi_connection.info.backend_pid
        with admin.begin() as other:
            assert other.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid}).scalar_one()

    event.listen(database.engine, "commit", fail_commit)
    try:
        armed.set()
        with connect(listener) as sock:
            sock.sendall(encode(orm("ORM-1701")))
            replies, closed = receive(sock, 1, until_closed=True)
        assert (replies, closed) == ([], True)
        assert not armed.is_set()  # the commit was reached, and failed
        assert_nothing_stored(database)
        assert audit_events(database, IMPORT) == []

        reply = listener.send(orm("ORM-1701"))
        check_ack(reply, "AA", "ORM-1701")
        assert len(all_rows(database, ImagingOrder)) == 1 and len(audit_events(database, ORDER_RECORD)) == 1
    finally:
        event.remove(database.engine, "commit", fail_commit)
        if admin is not None:
            admin.dispose()


def test_refusals_stand_while_the_database_is_down(listen: Callable[..., Listener], outage: Outage) -> None:
    """A refusal does not depend on the database: AE/AR go out even when their audit record cannot
    be written (as InboundService._refuse promises), framing errors included."""
    listener = listen(db=outage.database)
    outage.down()
    try:
        check_ack(listener.send(orm("DOWN-1", accession="")), "AE", "DOWN-1", error=101)
        check_ack(listener.send(orm("DOWN-2", sender=("EVIL", "HOSP"))), "AR", "DOWN-2", error=207)
        for stream in (b"junk" + encode(orm("DOWN-3")), encode(orm("DOWN-4") + "ZZZ|" + "x" * 4000)):
            with connect(listener) as sock:
                sock.sendall(stream)
                replies, closed = receive(sock, 1, until_closed=True)
            assert closed and len(replies) == 1, stream[:8]  # junk: AR, then DOWN-3 cannot be stored: closed
            check_ack(replies[0], "AR", None, error=207)
    finally:
        outage.up()


def test_overlong_values_are_answered_on_every_backend(database: Database, listen: Callable[..., Listener]) -> None:
    """Values longer than their columns (a 400-character PID-5 or ORC-12, a 70-character "UID")
    must not make PostgreSQL refuse the transaction: the sender would get no ACK and resend the
    message forever, while SQLite (which does not enforce VARCHAR lengths) accepts it."""
    listener = listen()
    long_name = "Z" * 400 + "^" + GIVEN
    long_uid = "1.2.826.0.1.3680043.8.498." + "1" * 44
    message = omi("LONG-1", name=long_name, study_uid=long_uid).replace("0303^WELBY^MARCUS", "0303^" + "W" * 400 + "^MARCUS")
    with connect(listener) as sock:
        sock.sendall(encode(message))
        replies, _ = receive(sock, 1)
    assert len(replies) == 1, "no ACK: the sender would resend this message forever"
    check_ack(replies[0], "AA", "LONG-1")
    [order] = all_rows(database, ImagingOrder)
    assert order.patient_name is not None and len(order.patient_name) <= 324
    assert order.ordering_provider is not None and len(order.ordering_provider) <= 324
    assert order.study_instance_uid is None or len(order.study_instance_uid) <= 64
    add_study(database, STUDY_UID, "ACC-1801")
    check_ack(listener.send(adt_a08("LONG-2", name=long_name)), "AA", "LONG-2")
    [order] = all_rows(database, ImagingOrder)
    assert order.patient_name is not None and len(order.patient_name) <= 324


# --------------------------------------------------------------------------- no PHI in logs


def test_no_phi_in_log_lines(database: Database, listen: Callable[..., Listener]) -> None:
    listener = listen()
    add_study(database, STUDY_UID, "ACC-5001")
    with structlog.testing.capture_logs() as lines:
        check_ack(listener.send(orm("PHI-1")), "AA", "PHI-1")
        check_ack(listener.send(orm("PHI-1")), "AA", "PHI-1")  # duplicate
        check_ack(listener.send(adt_a08("PHI-2")), "AA", "PHI-2")
        check_ack(listener.send(adt_a40("PHI-3", surviving=PATIENT_ID, prior="MRN-QX-PRIOR")), "AA", "PHI-3")
        check_ack(listener.send(orm("PHI-4", accession="")), "AE", "PHI-4")
        check_ack(listener.send(orm("PHI-5", version="9.9")), "AR", "PHI-5")
        check_ack(listener.send(orm("PHI-6", sender=("EVIL", "HOSP"))), "AR", "PHI-6")
        with connect(listener) as sock:  # a truncated block, then one over the limit
            sock.sendall(b"\x0b" + orm("PHI-7").encode()[:300] + encode(orm("PHI-8") + "ZZZ|" + NAME * 300))
            replies, closed = receive(sock, 2, until_closed=True)
        assert closed and [parse_ack(r)[0] for r in replies] == ["AR", "AR"]
    events = {line["event"] for line in lines}
    assert {"hl7.message_accepted", "hl7.duplicate", "hl7.message_refused", "hl7.frame_error"} <= events
    everything = repr(lines)
    for value in (PATIENT_ID, FAMILY, GIVEN, BIRTH_DATE, "MRN-QX-PRIOR", "ACC-5001", "PO-5001"):
        assert value not in everything, value
