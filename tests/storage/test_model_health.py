"""The console's model page queries (storage/model_health.py): the probability histogram's bins at
their edges, the threshold count, the counts by status and the dated drift history; SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from storage.db import Database
from storage.index import add_instance
from storage.metadata import extract_metadata
from storage.model_health import (
    CurrentDrift,
    DatedSample,
    ProbabilityHistogram,
    dated_results,
    histogram_edges,
    probability_histogram,
    results_by_status,
)
from storage.models import InferenceResult
from storage.monitoring import recent_results

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def _image(session: Any) -> int:
    ds = Dataset()
    ds.PatientID, ds.PatientName = "P", "X^Y"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1", generate_uid(), "CR"
    instance = add_instance(session, extract_metadata(ds), transfer_syntax_uid="1.2.840.10008.1.2.1",
                            relative_path="x", size=1, sha256="0" * 64, origin="received", calling_ae="T")
    return int(instance.id)


def _result(session: Any, *, probability: float | None, minutes_ago: float = 0, status: str = "ok", model: str = "m",
            version: str = "1.1.0", label: str | None = "NORMAL", threshold: float | None = 0.5,
            stats: dict[str, Any] | None = None) -> None:
    session.add(InferenceResult(
        instance_pk=_image(session), model_id=model, model_version=version, status=status, probability=probability,
        label=label, threshold=threshold, created_at=NOW - dt.timedelta(minutes=minutes_ago), input_stats=stats,
    ))


def _store(database: Database, probabilities: list[float], **kwargs: Any) -> None:
    with database.session() as session:
        for i, p in enumerate(probabilities):
            _result(session, probability=p, minutes_ago=len(probabilities) - i, **kwargs)


def test_edges_are_exact_at_both_ends() -> None:
    edges = histogram_edges(20)
    assert len(edges) == 21 and edges[0] == 0.0 and edges[-1] == 1.0
    assert edges[3] == 0.15 and edges[10] == 0.5
    assert histogram_edges(1) == (0.0, 1.0)
    with pytest.raises(ValueError, match="bins"):
        histogram_edges(0)


#: (probability, 20-bin index): an edge opens its bin; 1.0 (and above) is in the last, below 0 in the first.
BIN_CASES = [
    (0.0, 0), (0.0499999, 0), (0.05, 1), (0.15, 3), (0.3, 6), (0.35, 7), (0.5, 10), (0.5748, 11), (0.7, 14),
    (0.95, 19), (0.9999999, 19), (1.0, 19), (1.2, 19), (-0.1, 0),
]


@pytest.mark.parametrize(("probability", "index"), BIN_CASES)
def test_a_probability_lands_in_its_bin(database: Database, probability: float, index: int) -> None:
    _store(database, [probability])
    with database.read_session() as session:
        histogram = probability_histogram(session, "m", "1.1.0")
    assert histogram.counts == tuple(1 if i == index else 0 for i in range(20))
    assert histogram.total == 1
    assert histogram.edges[index] <= max(min(probability, 0.999), 0.0) < histogram.edges[index + 1]


def test_bins_agree_with_the_edges_they_return_for_every_edge(database: Database) -> None:
    edges = histogram_edges(20)
    _store(database, list(edges))  # 0.0, 0.05, ..., 1.0: one in each bin, two in the last
    with database.read_session() as session:
        assert probability_histogram(session, "m", "1.1.0").counts == (1,) * 19 + (2,)
        assert probability_histogram(session, "m", "1.1.0", bins=4).counts == (5, 5, 5, 6)
        single = probability_histogram(session, "m", "1.1.0", bins=1)
    assert single == ProbabilityHistogram(edges=(0.0, 1.0), counts=(21,), threshold=0.5, total=21, at_or_above_threshold=11)


#: (threshold, probabilities, at or above): equal to the threshold is positive, as the analyser decides.
THRESHOLD_CASES = [
    (0.5748, [0.5748, 0.57479, 0.9, 0.1], 2),
    (0.5, [0.5, 0.5, 0.4999], 2),
    (1.0, [1.0, 0.99], 1),
    (0.0, [0.0, 0.3], 2),
    (0.5, [], 0),
]


@pytest.mark.parametrize(("threshold", "probabilities", "above"), THRESHOLD_CASES)
def test_the_threshold_count_is_exact_at_the_threshold(
    database: Database, threshold: float, probabilities: list[float], above: int
) -> None:
    _store(database, probabilities)
    with database.read_session() as session:
        histogram = probability_histogram(session, "m", "1.1.0", threshold=threshold)
    assert (histogram.threshold, histogram.at_or_above_threshold, histogram.total) == (threshold, above, len(probabilities))


def test_only_analysed_results_of_the_model_version_count_and_the_threshold_defaults_to_the_newest(database: Database) -> None:
    with database.session() as session:
        _result(session, probability=0.2, minutes_ago=10, threshold=0.4)
        _result(session, probability=0.8, minutes_ago=5, threshold=0.6)  # the newest: its threshold is the default
        _result(session, probability=None, status="not-applicable", threshold=None)
        _result(session, probability=None, status="failed", threshold=None)
        _result(session, probability=0.9, version="1.0.0")
        _result(session, probability=0.9, model="other")
    with database.read_session() as session:
        histogram = probability_histogram(session, "m", "1.1.0")
        assert (histogram.total, histogram.threshold, histogram.at_or_above_threshold) == (2, 0.6, 1)
        assert histogram.counts[4] == histogram.counts[16] == 1
        empty = probability_histogram(session, "m", "9.9.9")
        assert (empty.total, empty.counts, empty.threshold, empty.at_or_above_threshold) == (0, (0,) * 20, None, 0)
        assert results_by_status(session, "m", "1.1.0") == {"ok": 2, "not-applicable": 1, "failed": 1}
        assert results_by_status(session, "m", "1.0.0") == {"ok": 1}
        assert results_by_status(session, "m", "9.9.9") == {}


def test_dated_results_are_the_drift_window_with_time_and_label(database: Database) -> None:
    with database.session() as session:
        _result(session, probability=0.1, minutes_ago=30, stats={"mean": 0.4}, label="NORMAL")
        _result(session, probability=0.7, minutes_ago=20, stats=None, label="PNEUMONIA")
        _result(session, probability=0.3, minutes_ago=10, stats={"mean": 0.6, "bad": "x"}, label=None)  # "bad": dropped
        _result(session, probability=None, minutes_ago=5, status="failed")
        _result(session, probability=0.9, minutes_ago=1, version="1.0.0")
    with database.read_session() as session:
        dated = dated_results(session, "m", "1.1.0", 10)
        assert dated == [
            DatedSample(0.3, {"mean": 0.6}, created_at=NOW - dt.timedelta(minutes=10), label=None),
            DatedSample(0.7, {}, created_at=NOW - dt.timedelta(minutes=20), label="PNEUMONIA"),
            DatedSample(0.1, {"mean": 0.4}, created_at=NOW - dt.timedelta(minutes=30), label="NORMAL"),
        ]
        window = recent_results(session, "m", "1.1.0", 10)
        assert [(s.probability, s.input_stats) for s in dated] == [(s.probability, s.input_stats) for s in window]
        assert dated_results(session, "m", "1.1.0", 2) == dated[:2]
        assert dated_results(session, "m", "1.1.0", 0) == []
    assert all(s.created_at.tzinfo is not None for s in dated)


def test_current_drift_alerts_only_in_drift_state() -> None:
    assert CurrentDrift("drift", 500, 500, 100, 0.25).alert
    assert not CurrentDrift("stable", 500, 500, 100, 0.25).alert
    assert not CurrentDrift("too few samples", 500, 3, 100, 0.25).alert
