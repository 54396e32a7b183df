"""The study aggregation rule (pure, table-tested) and the re-armable job it runs in."""

from __future__ import annotations

import datetime as dt

import pytest

from storage import jobs
from storage.db import Database
from storage.models import Job, JobState, ResultStatus, StudyStatus, utcnow
from storage.study_results import ImageOutcome, aggregate, basis_digest


def ok(pk: int, p: float, threshold: float = 0.5) -> ImageOutcome:
    return ImageOutcome(pk, result_pk=100 + pk, status=ResultStatus.OK, probability=p,
                        label="PNEUMONIA" if p >= threshold else "NORMAL", threshold=threshold,
                        model_id="m", model_version="1")


def not_applicable(pk: int, reason: str = "ViewPosition LL is not a frontal view") -> ImageOutcome:
    return ImageOutcome(pk, result_pk=100 + pk, status=ResultStatus.NOT_APPLICABLE, reason=reason)


FAILED = ImageOutcome(9, result_pk=109, status=ResultStatus.FAILED, reason="Pixel Data truncated")


@pytest.mark.parametrize(
    ("images", "amends", "status", "label", "probability", "analysed", "reasons"),
    [
        # two frontal images and a lateral: the highest probability decides
        ([ok(1, 0.2), ok(2, 0.7), not_applicable(3)], False, StudyStatus.FINAL, "PNEUMONIA", 0.7, 2,
         [{"reason": "not applicable: ViewPosition LL is not a frontal view", "images": 1}]),
        ([ok(1, 0.2), ok(2, 0.3)], False, StudyStatus.FINAL, "NORMAL", 0.3, 2, []),
        # one positive image is enough, whatever the others say
        ([ok(1, 0.1), ok(2, 0.55)], True, StudyStatus.AMENDED, "PNEUMONIA", 0.55, 2, []),
        # a positive image under a stricter threshold outranks a higher negative one of another model
        ([ok(1, 0.8, threshold=0.9), ok(2, 0.6, threshold=0.5)], False, StudyStatus.FINAL, "PNEUMONIA", 0.6, 2, []),
        # nothing analysable: "not analysed", never "negative"
        ([not_applicable(1), not_applicable(2), FAILED], False, StudyStatus.NOT_ANALYSED, None, None, 0,
         [{"reason": "not applicable: ViewPosition LL is not a frontal view", "images": 2},
          {"reason": "analysis failed: Pixel Data truncated", "images": 1}]),
        ([not_applicable(1)], True, StudyStatus.NOT_ANALYSED, None, None, 0,
         [{"reason": "not applicable: ViewPosition LL is not a frontal view", "images": 1}]),
    ],
)
def test_aggregation_rule(
    images: list[ImageOutcome], amends: bool, status: StudyStatus, label: str | None,
    probability: float | None, analysed: int, reasons: list[dict[str, object]],
) -> None:
    result = aggregate(images, amends=amends)
    assert (result.status, result.label, result.probability, result.analysed) == (status, label, probability, analysed)
    assert result.images == len(images) and result.reasons == reasons
    if probability is not None:
        deciding = next(i for i in images if i.probability == probability)
        assert result.deciding_result_pk == deciding.result_pk and result.threshold == deciding.threshold


def test_basis_changes_with_images_and_results_only() -> None:
    images = [ok(1, 0.2), not_applicable(2)]
    assert basis_digest(images) == basis_digest(list(reversed(images)))
    assert basis_digest(images) != basis_digest([*images, ok(3, 0.4)])
    assert basis_digest(images) != basis_digest([ok(1, 0.2), ImageOutcome(2, result_pk=999, status=ResultStatus.OK)])


def _claim(database: Database, worker: str) -> jobs.ClaimedJob:
    job = jobs.claim(database, ["study-result"], worker, dt.timedelta(seconds=60))
    assert job is not None
    return job


def test_rearm_while_running_runs_again_after_completion(database: Database) -> None:
    """A trigger that arrives while the job runs is not lost: the job runs once more."""
    now = utcnow()
    with database.session() as session:
        jobs.rearm(session, "study-result", "study-result:1.2.3", now - dt.timedelta(seconds=1))
    job = _claim(database, "w1")
    with database.session() as session:  # an image result of the same study commits meanwhile
        jobs.rearm(session, "study-result", "study-result:1.2.3", now - dt.timedelta(seconds=1))
    with database.session() as session:
        assert jobs.complete(session, job.id, "w1")
    with database.read_session() as session:
        row = session.get(Job, job.id)
        assert row is not None and row.state == JobState.PENDING and row.rerun_after is None
    again = _claim(database, "w2")
    with database.session() as session:
        assert jobs.complete(session, again.id, "w2")
    with database.read_session() as session:
        row = session.get(Job, job.id)
        assert row is not None and row.state == JobState.DONE
    assert jobs.claim(database, ["study-result"], "w3", dt.timedelta(seconds=60)) is None


def test_rearm_debounces_a_pending_job(database: Database) -> None:
    later = utcnow() + dt.timedelta(seconds=30)
    with database.session() as session:
        jobs.rearm(session, "study-result", "study-result:9", utcnow())
        jobs.rearm(session, "study-result", "study-result:9", later)
    with database.read_session() as session:
        [row] = session.query(Job).all()
        assert row.state == JobState.PENDING and row.run_after == later
    assert jobs.claim(database, ["study-result"], "w", dt.timedelta(seconds=60)) is None
