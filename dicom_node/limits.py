"""Limits of the DICOM node against abuse: associations per peer address, data set size per C-STORE.

* **Associations per host** (``[dicom] max_associations_per_host``): one address holding that many
  associations gets the next one rejected with A-ASSOCIATE-RJ *rejected-transient*, source
  *DICOM UL service-provider (presentation related function)*, reason *local-limit-exceeded*
  (PS3.8 Table 9-21: result 2, source 3, reason 2) — the standard way to say "not now, too many",
  which a well-behaved SCU retries later. ``max_associations`` bounds all peers together; this
  keeps one peer (a misconfigured modality opening one association per image, or an attacker)
  from taking every slot. Counted per acceptor process, like ``max_associations``.
* **Data set size** (``[dicom] max_dataset_bytes``): the receive file
  (:class:`dicom_node.storage_scp.ReceiveFile`) stops writing once a data set passes the limit,
  deletes what it wrote, and discards the rest as it arrives, so the disk never holds more than
  the limit per transfer; the C-STORE is answered **0xA700 "Refused: Out of Resources"** (PS3.4
  B.2.3, Table B.2-1), on an association that stays up. Why that status: A7xx is the one PS3.4
  C-STORE status for "the SCP cannot store this instance with the resources it has" (it is also
  what a full disk gets); "Error: Cannot understand" (Cxxx) would claim the data set is
  malformed, which it need not be, and an A-ABORT would also cost the peer's other instances on
  the association and look like a network fault. The instance is audited as a failed transfer
  (the ingest path's DICOM Instances Transferred record) and the breach as a Security Alert.

Every breach is refused every time; at most one PS3.15 A.5.3.11 Security Alert ("Use of
Restricted Function") and one WARN line per (address, kind) per minute is written
(:class:`audit.alert_throttle.AlertThrottle`), naming the AE title and address, never patient data.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from audit.alert_throttle import AlertThrottle
from audit.builders import security_alert
from audit.events import AuditEvent, AuditSource, EventType

log = structlog.get_logger(__name__)

#: PS3.8 Table 9-21: A-ASSOCIATE-RJ result, source and reason for "too many associations".
REJECTED_TRANSIENT = 0x02
SOURCE_PROVIDER_PRESENTATION = 0x03
LOCAL_LIMIT_EXCEEDED = 0x02

ASSOCIATIONS = "associations-per-host"
DATASET_SIZE = "dataset-size"


def associations_over_limit(active: Iterable[Any], assoc: Any, address: str, limit: int) -> str | None:
    """Why *assoc* from *address* must be rejected (None: it may proceed): *address* already holds
    *limit* other live associations among *active* (0 = no limit)."""
    if limit <= 0:
        return None
    held = sum(1 for other in active if other is not assoc and other.is_alive() and other.requestor.address == address)
    if held < limit:
        return None
    return f"{held} associations from this address already (limit {limit})"


class LimitAlerts:
    """Throttled Security Alerts and WARN lines for limit breaches (see the module docstring)."""

    def __init__(self, audit: Callable[[AuditEvent], None], source: AuditSource, ae_title: str) -> None:
        self._audit = audit
        self._source = source
        self._ae_title = ae_title
        self._throttle = AlertThrottle()

    def breached(self, calling: str, address: str, kind: str, what: str) -> None:
        breach = self._throttle.breach(address, kind)
        if breach is None:
            return
        log.warning("dicom.limit_exceeded", calling_ae=calling, address=address, limit=kind, refused=breach.count)
        try:
            self._audit(security_alert(
                self._source, event_type=EventType.USE_OF_RESTRICTED_FUNCTION, reporter_ae=self._ae_title,
                offender_id=calling or address, offender_host=address,
                description=breach.describe(f"DICOM {kind} limit: {what}"), when=dt.datetime.now(dt.UTC),
            ))
        except Exception:  # noqa: BLE001 - the refusal stands even if the audit store is down
            log.exception("audit.write_failed", event="security-alert")
