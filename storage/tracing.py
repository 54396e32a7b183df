"""The tracer the parts call: a small interface, a no-op by default (docs/operations.md, "Tracing").

Tracing is optional (``[tracing] enabled``, off by default). The parts and the job handlers
never import OpenTelemetry: they receive a :class:`Tracer` from the composition root, which is
:data:`NOOP_TRACER` unless tracing is on — then ``gateway.tracing`` adapts the OpenTelemetry SDK
to this interface. With the no-op, a span costs one method call and nothing is imported.

A trace crosses processes and hosts through the job queue: the span that queues a job stores
its W3C Trace Context ``traceparent`` in the job's payload (:data:`TRACEPARENT`), and the worker
that claims the job starts its span as a child of it (``parent=``). So one image's trace holds
``dicom.c-store`` (the acceptor) -> ``inference.analyse`` (a worker) -> ``deliver.<channel>`` (a
delivery worker), wherever each ran.

PHI: span attributes carry codes, sizes, counts, durations, AE titles and configured names —
never a patient's name or ID, and no Study/Series/SOP Instance UID either (they identify the
patient's study; a hash of one would still be a stable key to it, so they are left out, not
hashed). A failed span records the exception's class name only, never its message (a message may
quote a value read from the image).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol

#: The job payload key of the W3C ``traceparent`` (https://www.w3.org/TR/trace-context/) of the
#: span that queued the job.
TRACEPARENT = "traceparent"

AttributeValue = str | int | float | bool


class Span(Protocol):
    """One unit of work being traced."""

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        """Add a PHI-free fact (see the module docstring)."""
        ...

    def add_stage(self, name: str, start_ns: int, end_ns: int) -> None:
        """Record a finished child span *name* from ``time.time_ns()`` values measured earlier
        (e.g. the decode / preprocess / infer timings of an analysis)."""
        ...

    @property
    def traceparent(self) -> str | None:
        """This span's W3C ``traceparent``, to store with the work it queues; None when not tracing."""
        ...


class Tracer(Protocol):
    """Makes spans; one per process, built by the composition root and passed down."""

    @property
    def enabled(self) -> bool:
        """False for the no-op: callers skip gathering what only a span would use."""
        ...

    def span(
        self, name: str, *, parent: str | None = None, attributes: Mapping[str, AttributeValue] | None = None
    ) -> AbstractContextManager[Span]:
        """``with tracer.span(name) as span:`` — a child of *parent* (a ``traceparent``) when
        given, else of the span current in this thread, else a new trace. An exception leaving
        the block marks the span failed with the exception's class name."""
        ...

    def shutdown(self) -> None:
        """Export what is still buffered and stop (on process stop)."""
        ...


class _NoopSpan:
    """Does nothing; also its own context manager, so a no-op span allocates nothing."""

    __slots__ = ()

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        pass

    def add_stage(self, name: str, start_ns: int, end_ns: int) -> None:
        pass

    @property
    def traceparent(self) -> str | None:
        return None

    def __enter__(self) -> _NoopSpan:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


class NoopTracer:
    """The tracer when tracing is off: no spans, no imports, nothing exported."""

    __slots__ = ()

    @property
    def enabled(self) -> bool:
        return False

    def span(
        self, name: str, *, parent: str | None = None, attributes: Mapping[str, AttributeValue] | None = None
    ) -> AbstractContextManager[Span]:
        return NOOP_SPAN

    def shutdown(self) -> None:
        pass


#: Stateless, so one of each serves every caller (the default of every ``tracer=`` argument).
NOOP_SPAN = _NoopSpan()
NOOP_TRACER = NoopTracer()


def traceparent_of(payload: Mapping[str, Any]) -> str | None:
    """The ``traceparent`` stored in a job payload, if any (a malformed value starts a new trace)."""
    value = payload.get(TRACEPARENT)
    return value if isinstance(value, str) else None


def with_traceparent(payload: dict[str, Any], traceparent: str | None) -> dict[str, Any]:
    """*payload* with *traceparent* added when there is one (no key at all when not tracing)."""
    if traceparent is not None:
        payload[TRACEPARENT] = traceparent
    return payload
