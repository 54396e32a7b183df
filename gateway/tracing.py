"""OpenTelemetry behind :class:`storage.tracing.Tracer` (docs/operations.md, "Tracing").

Imported only when ``[tracing] enabled`` (by :func:`gateway.app.build_tracer`): the SDK, the
OTLP/HTTP exporter and their batching thread exist in a process only then. One tracer provider
per process (``serve``, its acceptor and worker processes, ``pneumo worker``) — passed down, never
installed as OpenTelemetry's global provider — with a batch span processor (spans leave in the
background, never on the C-STORE or job path) and an OTLP/HTTP protobuf exporter.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from conf.settings import TracingSettings
from storage.tracing import AttributeValue, Span

_PROPAGATOR = TraceContextTextMapPropagator()


class _OtelSpan:
    def __init__(self, span: trace.Span, tracer: trace.Tracer) -> None:
        self._span = span
        self._tracer = tracer

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, value)

    def add_stage(self, name: str, start_ns: int, end_ns: int) -> None:
        child = self._tracer.start_span(name, context=trace.set_span_in_context(self._span), start_time=start_ns)
        child.end(end_time=max(start_ns, end_ns))

    @property
    def traceparent(self) -> str | None:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self._span))
        return carrier.get("traceparent")


class OtelTracer:
    """The real tracer: spans exported to ``[tracing] otlp_endpoint`` over OTLP/HTTP."""

    def __init__(self, settings: TracingSettings, *, process_role: str) -> None:
        resource = Resource.create({
            "service.name": settings.service_name,
            "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
            "pneumo.process": process_role,
        })
        self._provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, timeout=settings.export_timeout_seconds)
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("pneumo-gateway")

    @property
    def enabled(self) -> bool:
        return True

    def span(
        self, name: str, *, parent: str | None = None, attributes: Mapping[str, AttributeValue] | None = None
    ) -> AbstractContextManager[Span]:
        return self._span(name, parent, attributes)

    @contextlib.contextmanager
    def _span(self, name: str, parent: str | None, attributes: Mapping[str, AttributeValue] | None) -> Iterator[Span]:
        context = _PROPAGATOR.extract({"traceparent": parent}) if parent is not None else None
        # Exceptions are recorded by hand: OpenTelemetry's own recording would export the
        # exception's message and stack trace, which may quote values read from the image.
        with self._tracer.start_as_current_span(
            name, context=context, attributes=dict(attributes or {}), record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield _OtelSpan(span, self._tracer)
            except BaseException as exc:
                span.set_attribute("error.type", exc.__class__.__name__)
                span.set_status(Status(StatusCode.ERROR, exc.__class__.__name__))
                raise

    def shutdown(self) -> None:
        """Flush the batch processor (bounded by the export timeout) and stop it."""
        self._provider.shutdown()
