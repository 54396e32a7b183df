"""Storage SCP (PS3.4 Annex B): a thin adapter from EVT_C_STORE to :class:`Ingestor`.

pynetdicom runs with ``STORE_RECV_CHUNKED_DATASET``: the dataset arrives as a Part 10 file
written while the PDUs came in, so a 7 MB radiograph is never decoded or held in memory here.

**A full disk while the data set arrives.** pynetdicom writes each received fragment to that file
from its DUL reactor thread; a write that fails (ENOSPC) raises there, kills the reactor and drops
the association with no C-STORE-RSP, leaving the partial file behind to keep the disk full.
:func:`install_receive_file` gives pynetdicom a receive file (:class:`ReceiveFile`) whose writes
never raise: on the first failure it deletes the partial file at once (freeing the space) and
discards the rest of the data set, so the message completes normally and :func:`handle_store`
answers PS3.4 B.2.3 "Refused: Out of Resources" (0xA700) on an association that stays up.

**One log line per instance.** Once the C-STORE status is known, ``dicom.store`` says what
arrived and what became of it: SOP Class UID, SOP Instance UID, transfer syntax, size in bytes,
the status sent (``0x0000``…) and the outcome (stored, duplicate, kept-existing, replaced, or
refused). UIDs only, never a patient's data; INFO when stored, WARNING when refused. Refusals
for lack of resources are the exception: a PACS retries them at its own pace, so they keep their
one rate-limited error line instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from pynetdicom import dimse_messages
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from dicom_node.errors import OutOfResourcesError, Service, dimse_boundary
from dicom_node.ingest import Ingestor, Peer, ReceivedInstance
from storage.uids import is_valid_uid

log = structlog.get_logger(__name__)

_install_lock = threading.Lock()


class ReceiveFile:
    """The file pynetdicom writes one incoming C-STORE data set into; a failed write never raises.

    It stands in for the ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")`` that
    ``pynetdicom.dimse_messages.DIMSEMessage.decode_msg`` creates, and offers what pynetdicom uses
    of it: ``name``, ``write``, ``file.flush`` and ``close`` (pynetdicom closes and unlinks it
    after the EVT_C_STORE handler). Writes are unbuffered (``os.write``): pynetdicom flushes after
    every fragment anyway, and an unbuffered file has no buffered bytes to fail on at close.

    After a failure (:attr:`error` set) the partial file is already gone and further writes are
    counted and dropped, so the transfer completes and the handler can answer 0xA700.

    A data set longer than :attr:`max_bytes` (``[dicom] max_dataset_bytes``, process-wide, 0 = no
    limit) fails the same way, with ``EFBIG``: no more than the limit ever reaches the disk
    (dicom_node/limits.py).
    """

    max_bytes: int = 0

    def __init__(
        self,
        mode: str = "w+b",
        buffering: int = -1,
        encoding: str | None = None,
        newline: str | None = None,
        suffix: str | None = None,
        prefix: str | None = None,
        dir: str | None = None,  # noqa: A002 - NamedTemporaryFile's signature
        delete: bool = True,
        *,
        errors: str | None = None,
    ) -> None:
        if "b" not in mode:
            raise ValueError("ReceiveFile is binary only")
        self.error: OSError | None = None
        self.file = self  # pynetdicom calls ``file.file.flush()``
        self._fd = -1
        self._length = 0
        try:
            self._fd, self.name = tempfile.mkstemp(suffix=suffix, prefix=prefix, dir=dir)
        except OSError as exc:  # no inode, no file descriptor: refuse the data set, not the association
            self.name = os.path.join(dir or tempfile.gettempdir(), f"unwritten-{uuid.uuid4().hex}{suffix or ''}")
            self.error = exc

    def write(self, data: bytes | bytearray | memoryview) -> int:
        size = len(data)
        if self.error is not None:
            return size
        self._length += size
        if 0 < self.max_bytes < self._length:
            self._fail(OSError(errno.EFBIG, f"the data set is longer than {self.max_bytes} bytes"))
            return size
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            self._fail(exc)
        return size

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        self.close()
        with contextlib.suppress(OSError):
            os.unlink(self.name)  # free the space now, not after the whole data set has arrived

    def __enter__(self) -> ReceiveFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def install_receive_file(max_bytes: int = 0) -> None:
    """Make pynetdicom receive C-STORE data sets into :class:`ReceiveFile` (process-wide, idempotent),
    none longer than *max_bytes* (0 = no limit).

    pynetdicom has no hook for the receive file; ``dimse_messages`` creates it through its
    module-level name ``NamedTemporaryFile``, which is what we rebind. Checked, not assumed: if a
    pynetdicom upgrade drops that name, start-up fails here instead of the guarantee silently
    disappearing (``tests/dicom_node/test_ingest_faults.py`` fills a real disk to prove it holds).
    """
    with _install_lock:
        ReceiveFile.max_bytes = max_bytes
        current = getattr(dimse_messages, "NamedTemporaryFile", None)
        if current is ReceiveFile:
            return
        if current is not tempfile.NamedTemporaryFile:
            raise RuntimeError(
                "pynetdicom.dimse_messages no longer creates its receive file with NamedTemporaryFile; "
                "dicom_node.storage_scp.install_receive_file must be revisited"
            )
        dimse_messages.NamedTemporaryFile = ReceiveFile  # type: ignore[attr-defined,assignment]


def receive_error(request: object) -> OSError | None:
    """The error that stopped the network layer writing *request*'s data set, if any."""
    dataset_file: Any = getattr(request, "_dataset_file", None)
    return dataset_file.error if isinstance(dataset_file, ReceiveFile) else None


def too_large(request: object) -> bool:
    """Whether *request*'s data set was discarded for passing ``[dicom] max_dataset_bytes``."""
    error = receive_error(request)
    return error is not None and error.errno == errno.EFBIG


def handle_store(event: Event, ingestor: Ingestor) -> int:
    request = event.request
    assert isinstance(request, C_STORE)  # pynetdicom calls this handler for C-STORE-RQ only
    assoc = event.assoc
    received = ReceivedInstance(
        path=Path(event.dataset_path),
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=str(request.AffectedSOPInstanceUID),
        transfer_syntax_uid=str(event.context.transfer_syntax),
        calling=Peer(assoc.requestor.ae_title, assoc.requestor.address, assoc.requestor.port),
        called_ae=assoc.acceptor.ae_title,
    )
    failed_write = receive_error(request)
    if failed_write is not None:
        if failed_write.errno == errno.EFBIG:
            refusal = OutOfResourcesError(f"the data set is longer than dicom.max_dataset_bytes ({ReceiveFile.max_bytes})")
        else:
            refusal = OutOfResourcesError(f"cannot write the received data set: {os.strerror(failed_write.errno or errno.EIO)}")
        ingestor.refuse(received, refusal)
        ingestor.resources_log.error(status=f"0x{refusal.status:04X}", detail=str(refusal), sop_class_uid=received.sop_class_uid)
        return refusal.status
    size = _size(received.path)  # before ingest, which moves the file into the store
    with dimse_boundary(Service.STORE, sop_class_uid=received.sop_class_uid) as failure:
        try:
            result = ingestor.ingest(received)
        except OutOfResourcesError as exc:
            # Not through the boundary's log: the sender retries this at its own pace.
            ingestor.resources_log.error(
                status=f"0x{exc.status:04X}", detail=str(exc)[:200], sop_class_uid=received.sop_class_uid
            )
            return exc.status
    status = failure.status if failure.status is not None else 0x0000
    log_instance(received, size, status, "refused" if failure.status is not None else str(result))
    return status


def log_instance(received: ReceivedInstance, size: int | None, status: int, outcome: str) -> None:
    """The ``dicom.store`` line of one C-STORE whose status is known (see the module docstring)."""
    (log.info if outcome != "refused" else log.warning)(
        "dicom.store",
        sop_class_uid=_uid(received.sop_class_uid),
        sop_instance_uid=_uid(received.sop_instance_uid),
        transfer_syntax_uid=_uid(received.transfer_syntax_uid),
        size=size,
        status=f"0x{status:04X}",
        outcome=outcome,
    )


def _uid(value: str) -> str:
    """A UID as sent, or a placeholder: a peer can put any text in the request's UID fields."""
    return value if is_valid_uid(value) else "[not a valid UID]"


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
