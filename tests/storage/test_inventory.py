"""The pure mappings behind ``pneumo instances`` (issue 14, item 4): kind and outcome, table-tested.

The query itself runs through the real CLI against a real ``pneumo serve`` in
tests/gateway/test_cli_first_hour.py.
"""

from __future__ import annotations

import pytest

from storage.inventory import Outcome, instance_kind, instance_outcome


@pytest.mark.parametrize(
    ("sop_class_uid", "kind"),
    [
        ("1.2.840.10008.5.1.4.1.1.1", "image"),  # CR
        ("1.2.840.10008.5.1.4.1.1.1.1", "image"),  # DX for presentation
        ("1.2.840.10008.5.1.4.1.1.2", "image"),  # CT
        ("1.2.840.10008.5.1.4.1.1.88.34", "SR"),  # Comprehensive 3D SR (ours)
        ("1.2.840.10008.5.1.4.1.1.88.22", "SR"),  # Enhanced SR
        ("1.2.840.10008.5.1.4.1.1.7", "SC"),  # Secondary Capture (our summary image)
        ("1.2.840.10008.5.1.4.1.1.7.4", "SC"),  # Multi-frame True Color SC
        ("1.2.840.10008.5.1.4.1.1.77.1.4", "image"),  # VL Photographic: starts with ...1.7 but is not SC
    ],
)
def test_instance_kind(sop_class_uid: str, kind: str) -> None:
    assert instance_kind(sop_class_uid) == kind


@pytest.mark.parametrize(
    ("origin", "job", "error", "status", "reason", "expected"),
    [
        ("received", "pending", None, None, None, Outcome("pending")),
        ("received", "running", None, None, None, Outcome("running")),
        ("received", "done", None, "ok", None, Outcome("ok")),
        ("received", "done", None, "not-applicable", "modality CT is not one of CR, DX",
         Outcome("not-applicable", "modality CT is not one of CR, DX")),
        ("received", "done", None, "failed", "unreadable DICOM data set: EOFError",
         Outcome("failed", "unreadable DICOM data set: EOFError")),
        # Dead-lettered before any result: the job's first error line is the reason.
        ("received", "failed", "UnavailableError: disk\nTraceback ...", None, None, Outcome("failed", "UnavailableError: disk")),
        ("received", "failed", None, None, None, Outcome("failed")),
        # The SR was made, the summary image then failed for good: both are said.
        ("received", "failed", "summary image not built: too small", "ok", None,
         Outcome("ok", "job failed: summary image not built: too small")),
        # Replaced content is being analysed again: the earlier result is provisional.
        ("received", "pending", None, "ok", None, Outcome("pending")),
        ("generated", None, None, None, None, Outcome("generated")),
        ("received", None, None, None, None, Outcome("not-queued", "no analysis job for this instance")),
    ],
)
def test_instance_outcome(
    origin: str, job: str | None, error: str | None, status: str | None, reason: str | None, expected: Outcome
) -> None:
    assert instance_outcome(origin, job, error, status, reason) == expected
