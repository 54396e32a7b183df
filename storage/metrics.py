"""Prometheus metrics of the whole deployment, projected from the database at scrape time.

Why a projection and not counters incremented where the work happens: the work is done by
several processes (``pneumo serve``, its extra DICOM acceptors, ``pneumo worker`` processes on
other hosts) that share one database and nothing else, and only the ``serve`` process has an HTTP
port. Every one of them already writes a row for what it did — an image result, a delivery
attempt, an instance, an audit record — so :class:`DatabaseCollector` tails those tables by
primary key (:mod:`storage.telemetry`) and keeps cumulative counters and histograms in memory.

Semantics (docs/operations.md, "Metrics"):

* The tails start at the newest rows when the collector is created: the counters start at 0
  with the process, as any Prometheus counter does after a restart (``rate()`` handles that).
* One scrape reads at most ``max_rows`` rows per table, so a scrape after a burst of 100,000
  images stays cheap; the rest is read by the next scrapes (``pneumo_metrics_batch_full`` says
  when a tail is behind).
* Keys are not committed in key order on PostgreSQL: two workers take ids 7 and 8 from the
  sequence, and 8 may commit first. A key skipped by a tail is remembered as a *gap* and read
  again on the following scrapes for :data:`GAP_SECONDS` (a rolled-back insert leaves a gap for
  ever, so gaps expire); a row whose transaction stays open longer than that is not counted.
* The gauges (queue depth, oldest due job, failing destinations) are the queries of
  :mod:`storage.status`, the ones ``pneumo status`` answers with, evaluated at each scrape.

Labels are bounded and PHI-free: codes (not-analysed reason, failure class, DIMSE status, ACK
code), job kinds, channels, destination names from the configuration (anything else is
``other``; the destinations of FHIR Subscriptions, created by API clients, are one ``subscription``)
and the AE titles of the configured DICOM peers (anything else is ``other``).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from storage import telemetry
from storage.db import Database
from storage.models import ResultStatus, utcnow
from storage.outbox import Channel
from storage.status import destination_health, queue_depths

log = structlog.get_logger(__name__)

#: How long a key skipped by a tail is looked for again (an insert's transaction open longer is missed).
GAP_SECONDS = 120.0
#: At most this many gaps per tail are remembered (the newest): a sequence that jumped by
#: thousands (a large rolled-back batch) must not make every scrape look for all of them.
MAX_GAPS = 1000

#: Seconds; inference stages run from about a millisecond (decode) to seconds (a large image on CPU).
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Seconds; a delivery is one association / MLLP exchange / HTTP POST, up to the channel's timeout.
DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Seconds; an inbound association lasts from an echo (milliseconds) to a whole study or a
#: modality that keeps it open between images (minutes).
ASSOCIATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


F = TypeVar("F")


@dataclass
class _Tail(Generic[F]):
    """A cursor over one table's keys, with the keys it skipped (gaps) still to look for."""

    fetch: Callable[[Session, int, int, Sequence[int] | None], list[F]]
    key: Callable[[F], int]
    cursor: int
    gaps: dict[int, float] = field(default_factory=dict)  # key -> monotonic time first missed
    full: bool = False

    def read(self, session: Session, limit: int, now: float) -> list[F]:
        """The rows of the gaps that have appeared, then up to *limit* new rows. The state changes
        only once both queries have answered: a scrape that fails half-way loses no row."""
        for key in [key for key, since in self.gaps.items() if now - since > GAP_SECONDS]:
            del self.gaps[key]
        found = self.fetch(session, 0, len(self.gaps), sorted(self.gaps)) if self.gaps else []
        new = self.fetch(session, self.cursor, limit, None)
        for row in found:
            self.gaps.pop(self.key(row), None)
        self.full = len(new) >= limit
        expected = self.cursor + 1
        for row in new:
            key = self.key(row)
            for missing in range(max(expected, key - MAX_GAPS), key):
                self.gaps[missing] = now
            expected = key + 1
        if new:
            self.cursor = self.key(new[-1])
        if len(self.gaps) > MAX_GAPS:
            for key in sorted(self.gaps)[: len(self.gaps) - MAX_GAPS]:
                del self.gaps[key]
        return found + new


class _Histogram:
    """Cumulative bucket counts per label tuple (what a prometheus_client Histogram keeps, here
    fed from rows rather than from ``observe`` calls in the code being measured)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts, total = self.series.setdefault(labels, ([0] * (len(self.bounds) + 1), [0.0]))
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                counts[index] += 1
        counts[-1] += 1
        total[0] += value

    def family(self, name: str, documentation: str, label_names: Sequence[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=label_names)
        for labels, (counts, total) in sorted(self.series.items()):
            buckets = [(_bound(b), float(c)) for b, c in zip(self.bounds, counts, strict=False)]
            family.add_metric(list(labels), [*buckets, ("+Inf", float(counts[-1]))], total[0])
        return family


def _bound(value: float) -> str:
    return repr(float(value))


class DatabaseCollector(Collector):
    """A prometheus_client custom collector: cluster-wide counters tailed from the database,
    gauges queried at each scrape. Thread-safe (one scrape at a time reads the tails).

    *destinations*: the configured destination names per channel (``dicom``, ``hl7``); other
    names in the rows become ``other``. *peers*: the AE titles of the configured DICOM peers
    (``[[dicom.peers]]``); other calling AE titles become ``other``. *max_rows*: rows read per
    table per scrape.
    """

    def __init__(
        self,
        database: Database,
        *,
        destinations: Mapping[str, Iterable[str]] | None = None,
        peers: Iterable[str] = (),
        max_rows: int = 5000,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self._database = database
        self._destinations = {channel: frozenset(names) for channel, names in (destinations or {}).items()}
        self._peers = frozenset(peers)
        self._max_rows = max_rows
        self._clock = clock
        self._lock = threading.Lock()
        with database.read_session() as session:
            start = telemetry.cursors(session)
        self._results = _Tail(telemetry.results_after, _key, start.result)
        self._attempts = _Tail(telemetry.attempts_after, _key, start.attempt)
        self._instances = _Tail(telemetry.instances_after, _key, start.instance)
        self._audit = _Tail(telemetry.audit_after, lambda fact: fact.seq, start.audit)
        self._associations = _Tail(telemetry.associations_after, _key, start.association)
        self._counters: dict[str, defaultdict[tuple[str, ...], float]] = defaultdict(lambda: defaultdict(float))
        self._stages = _Histogram(STAGE_BUCKETS)
        self._delivery_seconds = _Histogram(DELIVERY_BUCKETS)
        self._association_seconds = _Histogram(ASSOCIATION_BUCKETS)

    # -- prometheus_client's Collector protocol ------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """The families without samples: registering the collector must not query the database."""
        return list(self._families(empty=True))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            started = time.perf_counter()
            up = 1.0
            gauges: list[Metric] = []
            try:
                with self._database.read_session() as session:
                    self._catch_up(session)
                    gauges = self._gauges(session)
            except SQLAlchemyError as exc:
                # The counters keep what they had; the scrape still answers, and says the database did not.
                log.warning("metrics.database_unavailable", error=exc.__class__.__name__)
                up = 0.0
            families = list(self._families(empty=False))
            seconds = time.perf_counter() - started
        yield from families
        yield from gauges
        yield GaugeMetricFamily("pneumo_metrics_database_up", "1 when this scrape could read the database.", value=up)
        yield GaugeMetricFamily("pneumo_metrics_collect_seconds", "Time this scrape spent reading the database.",
                                value=seconds)
        behind = GaugeMetricFamily("pneumo_metrics_batch_full",
                                   "1 when the last scrape read max_rows_per_scrape rows of the table: it is catching up.",
                                   labels=["table"])
        for table, tail in self._tails().items():
            behind.add_metric([table], 1.0 if tail.full else 0.0)
        yield behind

    # -- reading the tails ---------------------------------------------------------------------

    def _tails(self) -> dict[str, _Tail[Any]]:
        return {"inference_result": self._results, "delivery_attempt": self._attempts,
                "instance": self._instances, "audit_record": self._audit, "dicom_association": self._associations}

    def _catch_up(self, session: Session) -> None:
        now = time.monotonic()
        count = self._counters
        for result in self._results.read(session, self._max_rows, now):
            count["results"][(result.status,)] += 1
            if result.status == ResultStatus.OK:
                count["predictions"][(telemetry.safe_label(result.label),)] += 1
                for stage, ms in result.timings_ms.items():
                    self._stages.observe((stage,), ms / 1000.0)
            else:
                count["not_analysed"][(result.status, result.reason_code or "other")] += 1
        for attempt in self._attempts.read(session, self._max_rows, now):
            channel = telemetry.safe_label(attempt.channel)
            destination = self._destination(attempt.channel, attempt.destination)
            count["attempts"][(channel, destination, telemetry.safe_label(attempt.outcome))] += 1
            if attempt.failure_class is not None:
                count["failures"][(channel, destination, attempt.failure_class)] += 1
            self._delivery_seconds.observe((channel, destination), attempt.seconds)
        for instance in self._instances.read(session, self._max_rows, now):
            origin = telemetry.safe_label(instance.origin)
            count["instances"][(origin,)] += 1
            count["bytes"][(origin,)] += instance.size
        for record in self._audit.read(session, self._max_rows, now):
            count["audit"][(record.event, record.outcome)] += 1
            if record.event_type is not None:
                count["alerts"][(record.event_type,)] += 1
            if record.refused_status is not None:
                count["rejected"][(record.refused_status,)] += 1
            if record.hl7_type is not None:
                count["hl7"][(record.hl7_type, record.ack or "none")] += 1
        for association in self._associations.read(session, self._max_rows, now):
            calling = telemetry.safe_label(association.calling_ae, self._peers)
            count["associations"][(calling, association.ended_by)] += 1
            self._association_seconds.observe((calling,), association.seconds)

    def _destination(self, channel: str, name: str) -> str:
        if channel == Channel.FHIR_SUBSCRIPTION:
            return "subscription"
        return name if name in self._destinations.get(channel, frozenset()) else "other"

    def _gauges(self, session: Session) -> list[Metric]:
        now = self._clock()
        jobs = GaugeMetricFamily("pneumo_jobs", "Jobs by kind and state: queued (pending), due (may run now), "
                                 "running, dead_letter.", labels=["kind", "state"])
        oldest = GaugeMetricFamily("pneumo_job_oldest_due_age_seconds",
                                   "How long the longest-waiting due job of the kind could have run.", labels=["kind"])
        for depth in queue_depths(session, now):
            kind = telemetry.safe_label(depth.kind)
            for state, value in (("queued", depth.queued), ("due", depth.due), ("running", depth.running),
                                 ("dead_letter", depth.dead_letter)):
                jobs.add_metric([kind, state], float(value))
            oldest.add_metric([kind], depth.oldest_due_age_seconds(now) or 0.0)
        streak = GaugeMetricFamily("pneumo_delivery_failing_streak",
                                   "Failed attempts since the destination's last success.", labels=["channel", "destination"])
        pending = GaugeMetricFamily("pneumo_delivery_pending", "Deliveries queued or running.",
                                    labels=["channel", "destination"])
        dead = GaugeMetricFamily("pneumo_delivery_dead_letter", "Dead-lettered deliveries.", labels=["channel", "destination"])
        sums: dict[str, defaultdict[tuple[str, str], float]] = {name: defaultdict(float) for name in ("s", "p", "d")}
        for health in destination_health(session):
            labels = (telemetry.safe_label(health.channel), self._destination(health.channel, health.destination))
            sums["s"][labels] = max(sums["s"][labels], health.failing_streak)  # the worst, not a sum
            sums["p"][labels] += health.pending
            sums["d"][labels] += health.dead_letter
        for family, key in ((streak, "s"), (pending, "p"), (dead, "d")):
            for labels, amount in sorted(sums[key].items()):
                family.add_metric(list(labels), amount)
        return [jobs, oldest, streak, pending, dead]

    # -- the counter families ------------------------------------------------------------------

    def _families(self, *, empty: bool) -> Iterator[Metric]:
        specs: tuple[tuple[str, str, str, Sequence[str]], ...] = (
            ("instances", "pneumo_instances_stored", "Instances stored, by origin: received from peers or generated "
             "(SR, summary image).", ["origin"]),
            ("bytes", "pneumo_instance_bytes", "Bytes of the instances stored, by origin.", ["origin"]),
            ("rejected", "pneumo_dicom_instances_rejected", "C-STOREs refused, by DIMSE status (audited "
             "DICOM Instances Transferred with a failure outcome).", ["status"]),
            ("results", "pneumo_inference_results", "Image results, by status (ok, not-applicable, failed).",
             ["status"]),
            ("predictions", "pneumo_predictions", "Analysed images, by the classifier's label.", ["label"]),
            ("not_analysed", "pneumo_not_analysed", "Images not analysed, by status and reason code.",
             ["status", "reason"]),
            ("attempts", "pneumo_delivery_attempts", "Delivery attempts, by channel, destination and outcome.",
             ["channel", "destination", "outcome"]),
            ("failures", "pneumo_delivery_failures", "Failed delivery attempts, by channel, destination and class "
             "(no-answer, refused, not-configured).", ["channel", "destination", "class"]),
            ("hl7", "pneumo_hl7_messages", "Inbound HL7 messages, by message type and the ACK code we answered.",
             ["type", "ack"]),
            ("associations", "pneumo_dicom_associations", "Accepted DICOM associations, by calling AE title (a "
             "configured peer's, else other) and how they ended (released, aborted, closed); rejected ones are "
             "Security Alerts.", ["calling_ae", "end"]),
            ("alerts", "pneumo_security_alerts", "Audited Security Alerts (throttled per peer), by event type.",
             ["type"]),
            ("audit", "pneumo_audit_events", "Audit records, by event id and outcome.", ["event", "outcome"]),
        )
        for key, name, documentation, labels in specs:
            family = CounterMetricFamily(name, documentation, labels=labels)
            if not empty:
                for values, value in sorted(self._counters[key].items()):
                    family.add_metric(list(values), value)
            yield family
        stages = self._stages if not empty else _Histogram(STAGE_BUCKETS)
        yield stages.family("pneumo_inference_stage_seconds", "Inference time per stage of analysed images "
                            "(read, decode, preprocess, infer, total).", ["stage"])
        deliveries = self._delivery_seconds if not empty else _Histogram(DELIVERY_BUCKETS)
        yield deliveries.family("pneumo_delivery_attempt_seconds", "Duration of delivery attempts.",
                                ["channel", "destination"])
        associations = self._association_seconds if not empty else _Histogram(ASSOCIATION_BUCKETS)
        yield associations.family("pneumo_dicom_association_seconds", "Duration of accepted DICOM associations, "
                                  "from the A-ASSOCIATE-RQ to the closed connection.", ["calling_ae"])


def _key(
    fact: telemetry.ResultFact | telemetry.AttemptFact | telemetry.InstanceFact | telemetry.AssociationFact,
) -> int:
    return fact.id
