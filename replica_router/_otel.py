"""OpenTelemetry spans for routing decisions: the only module that imports OpenTelemetry.

Each session's checkout is one INTERNAL span, ``replica_router.reader`` or
``replica_router.writer``, current while the checkout runs (so a driver
instrumentation's BEGIN nests under it) and ended when the session is handed out:
it carries the decision, not the session's statements, which SQLAlchemy's and the
driver's instrumentations already trace as CLIENT spans. A writer's flush and
COMMIT get a ``replica_router.commit`` span, so a failed commit has a span to fail.
Attributes follow the stable database conventions where they apply
(``db.system.name``, ``db.namespace``, ``server.address``, ``server.port``,
``error.type``, ``db.response.status_code``), the rest are ``replica_router.*``.
"""

from __future__ import annotations

import re
from contextvars import Token
from importlib import metadata
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NoOpTracer,
    NoOpTracerProvider,
    ProxyTracerProvider,
    Span,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    TracerProvider,
)

from ._exceptions import ReplicaRouterError
from ._nodes import Node, Role, Topology
from ._retry import ErrorKind, classify, sqlstate_of

if TYPE_CHECKING:
    from ._consistency import ReadPolicy

__all__ = ["SCOPE", "OtelTracing", "from_global_provider", "tracing_for"]

# The instrumentation scope of the router's spans and metrics.
SCOPE = "replica_router"


def version() -> str:
    """The installed replica-router version, for the instrumentation scope."""
    try:
        return metadata.version("replica-router")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source tree
        return "0"


def from_global_provider() -> OtelTracing | None:
    """Spans from the global tracer provider, if one was configured (not the API's
    proxy or no-op provider, and not an SDK disabled by ``OTEL_SDK_DISABLED``)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, ProxyTracerProvider | NoOpTracerProvider):
        return None
    return tracing_for(provider)


def tracing_for(provider: TracerProvider) -> OtelTracing | None:
    """Spans from ``provider``; ``None`` if it only makes no-op tracers."""
    tracer = provider.get_tracer(SCOPE, version())
    if isinstance(tracer, NoOpTracer):
        return None
    return OtelTracing(tracer)


def address(node: Node) -> dict[str, Any]:
    """The database convention's attributes of a node: database, host, port (the
    system, ``postgresql``, is set when a span starts).

    A multi-host URL (``?host=a:5432&host=b:5432``) has no single address: the
    server address is left out rather than guessed.
    """
    url = node.url
    attributes: dict[str, Any] = {}
    if url.database:
        attributes["db.namespace"] = url.database
    if url.host:
        attributes["server.address"] = url.host
        attributes["server.port"] = url.port or 5432
    return attributes


class OtelTracing:
    """Makes the spans of one router's sessions with ``tracer``."""

    __slots__ = ("tracer",)

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def reader(self, policy: ReadPolicy, topology: Topology) -> _CheckoutSpan:
        attributes: dict[str, Any] = {
            "db.system.name": "postgresql",
            "replica_router.intent": "reader",
            "replica_router.policy": policy.name,
            "replica_router.read_your_writes": policy.read_your_writes,
        }
        if policy.max_lag_seconds is not None:
            attributes["replica_router.max_lag_seconds"] = policy.max_lag_seconds
        return _CheckoutSpan(self.tracer, "replica_router.reader", attributes, topology, policy)

    def writer(self, node: Node) -> _CheckoutSpan:
        attributes = {"db.system.name": "postgresql", "replica_router.intent": "writer"}
        return _CheckoutSpan(self.tracer, "replica_router.writer", attributes, None, None)

    def commit(self, node: Node) -> _CommitSpan:
        return _CommitSpan(self.tracer, node)


class _CurrentSpan:
    """A span that is current from ``__enter__`` to ``__exit__``, then ended."""

    __slots__ = ("_recording", "_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._recording = span.is_recording()
        self._token: Token[Context] | None = None

    def __enter__(self) -> _CurrentSpan:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._recording:
                self._finish(exc)
            self._span.end()
        finally:
            if self._token is not None:
                otel_context.detach(self._token)

    def _finish(self, exc: BaseException | None) -> None:
        if isinstance(exc, Exception):
            failed(self._span, exc)


class _CheckoutSpan(_CurrentSpan):
    """``replica_router.reader`` / ``replica_router.writer``: one checkout."""

    __slots__ = (
        "_chosen",
        "_failures",
        "_policy",
        "_replay_wait",
        "_skipped",
        "_topology",
        "_tried",
    )

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        attributes: dict[str, Any],
        topology: Topology | None,
        policy: ReadPolicy | None,
    ) -> None:
        super().__init__(tracer.start_span(name, kind=SpanKind.INTERNAL, attributes=attributes))
        self._topology = topology
        self._policy = policy
        self._failures = 0
        self._skipped: list[str] = []
        self._tried: list[Node] = []
        self._replay_wait: float | None = None
        self._chosen = False

    def __enter__(self) -> _CheckoutSpan:
        super().__enter__()
        return self

    # -- what the routing code reports -------------------------------------------------

    def failed_attempt(self, node: Node, exc: BaseException | None) -> None:
        self._failures += 1
        if not self._recording:
            return
        self._tried.append(node)
        if exc is None:
            reason, error_type = "behind", None
        else:
            kind = classify(exc, during_checkout=True)
            reason, error_type = f"{kind.value}: {innermost(exc)}", error_type_of(exc)
        self._skipped.append(f"{node.name} ({reason})")
        event: dict[str, Any] = {
            "replica_router.node": node.name,
            "replica_router.reason": reason,
        }
        if error_type is not None:
            event["error.type"] = error_type
        self._span.add_event("replica_router.attempt_failed", event)

    def replay_checked(self, node: Node, seconds: float) -> None:
        self._replay_wait = (self._replay_wait or 0.0) + seconds

    def chosen(self, node: Node, decision: str) -> None:
        self._chosen = True
        if not self._recording:
            return
        state = node.state
        attributes = address(node)
        attributes["replica_router.node"] = node.name
        attributes["replica_router.node.role"] = node.role.value
        attributes["replica_router.decision"] = decision
        if node.role is Role.REPLICA:
            if state.lag_seconds is not None:
                attributes["replica_router.node.lag_seconds"] = state.lag_seconds
            if state.lag_bytes is not None:
                attributes["replica_router.node.lag_bytes"] = state.lag_bytes
        self._summary(attributes, node)
        self._span.set_attributes(attributes)

    # -- the end of the checkout ------------------------------------------------------

    def _finish(self, exc: BaseException | None) -> None:
        if not self._chosen:
            attributes: dict[str, Any] = {}
            self._summary(attributes, None)
            self._span.set_attributes(attributes)
        super()._finish(exc)

    def _summary(self, attributes: dict[str, Any], chosen: Node | None) -> None:
        attributes["replica_router.attempts"] = self._failures + (chosen is not None)
        if self._replay_wait is not None:
            attributes["replica_router.replay_wait"] = self._replay_wait
        skipped = self._skipped + self._unfit(chosen)
        if skipped:
            attributes["replica_router.skipped"] = skipped

    def _unfit(self, chosen: Node | None) -> list[str]:
        """Replicas left out before any attempt, with the reason ``status()`` gives."""
        if self._topology is None:
            return []
        max_lag = self._policy.max_lag_seconds if self._policy is not None else None
        unfit = []
        for node in self._topology.replicas:
            reason = node.state.reason
            if reason is None or node is chosen or node in self._tried:
                continue
            # A read with its own bound may use a replica lagging by the router's.
            if (
                reason == "lagging"
                and max_lag is not None
                and ((node.state.lag_seconds or 0.0) <= max_lag)
            ):
                continue
            unfit.append(f"{node.name} ({reason})")
        return unfit


class _CommitSpan(_CurrentSpan):
    """``replica_router.commit``: a writer's flush and COMMIT (the flush's statements
    nest under it)."""

    __slots__ = ()

    def __init__(self, tracer: Tracer, node: Node) -> None:
        attributes = address(node)
        attributes["db.system.name"] = "postgresql"
        attributes["replica_router.node"] = node.name
        attributes["replica_router.node.role"] = node.role.value
        attributes["replica_router.intent"] = "writer"
        super().__init__(
            tracer.start_span(
                "replica_router.commit", kind=SpanKind.INTERNAL, attributes=attributes
            )
        )


_WORD = re.compile(r"(?<!^)(?=[A-Z])")


def reason_of(exc: BaseException) -> str:
    """The classified reason of a failure: the error class of what went wrong below
    (``connection``, ``serialization``, ...), else the router's own refusal
    (``no_healthy_replica``, ``consistency_timeout``, ``primary_unavailable``)."""
    kind = classify(exc)
    if kind is not ErrorKind.OTHER or not isinstance(exc, ReplicaRouterError):
        return kind.value
    return _WORD.sub("_", type(exc).__name__.removesuffix("Error")).lower()


def innermost(exc: BaseException) -> str:
    """The class name of the driver's own error under SQLAlchemy's wrappers (its
    adapter's classes are all called ``Error``)."""
    seen = [exc]
    while True:
        item = seen[-1]
        orig = getattr(item, "orig", None)
        below = orig if isinstance(orig, BaseException) else item.__cause__
        if below is None or any(below is s for s in seen):
            return type(item).__name__
        seen.append(below)


def error_type_of(exc: BaseException) -> str:
    """``error.type``: the SQLSTATE when the database sent one, else the class."""
    sqlstate = sqlstate_of(exc)
    if sqlstate is not None:
        return sqlstate
    cls = type(exc)
    if isinstance(exc, ReplicaRouterError):
        return f"replica_router.{cls.__qualname__}"
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def failed(span: Span, exc: BaseException) -> None:
    """Set a span's error status and attributes for ``exc``.

    The description is the reason and the exception class, and our own messages,
    which name nodes only: a driver's message may quote SQL and its parameters.
    """
    reason = reason_of(exc)
    attributes: dict[str, Any] = {
        "error.type": error_type_of(exc),
        "replica_router.error": reason,
    }
    sqlstate = sqlstate_of(exc)
    if sqlstate is not None:
        attributes["db.response.status_code"] = sqlstate
    span.set_attributes(attributes)
    detail = str(exc) if isinstance(exc, ReplicaRouterError) else type(exc).__name__
    span.set_status(Status(StatusCode.ERROR, f"{reason}: {detail}"))
