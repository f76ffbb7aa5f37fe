"""The seam between routing and tracing: what a session's checkout tells a tracer.

Routing code (``_reads``, ``_writes``, ``_checkout``) reports its decisions through
these Protocols, at the points where it already counts them, and never imports
OpenTelemetry. ``Checkout.trace`` holds the :class:`Tracing` in use, or ``None``:
with tracing off, a session costs one attribute test. It starts as
:class:`AutoTracing`, which decides once, at the first session: if OpenTelemetry is
loaded and a real tracer provider is set, sessions get spans (``_otel``), else
``None`` from then on. ``replica_router.otel.instrument()`` sets it explicitly.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ._consistency import ReadPolicy
    from ._nodes import Node, Topology

__all__ = ["AutoTracing", "CheckoutSpan", "Traced", "Tracing"]


class CheckoutSpan(Protocol):
    """One session's checkout, as a tracer records it."""

    def chosen(self, node: Node, decision: str) -> None:
        """The session was opened on ``node``; ``decision`` says why there."""

    def failed_attempt(self, node: Node, exc: BaseException | None) -> None:
        """An attempt on ``node`` failed with ``exc`` (down, full), or, with ``None``,
        the replica had not replayed the client's last write."""

    def replay_checked(self, node: Node, seconds: float) -> None:
        """The replica's replay position was re-read (and waited for) this long."""


class Tracing(Protocol):
    """Makes the spans of one router's sessions."""

    def reader(
        self, policy: ReadPolicy, topology: Topology
    ) -> AbstractContextManager[CheckoutSpan | None]:
        """A reader's checkout; current while it runs, ended when it is over."""

    def writer(self, node: Node) -> AbstractContextManager[CheckoutSpan | None]:
        """A writer's checkout on the primary ``node``."""

    def commit(self, node: Node) -> AbstractContextManager[object]:
        """A writer's flush and COMMIT on ``node``."""


class Traced(Protocol):
    """What :class:`AutoTracing` resolves for: the holder of ``trace``."""

    trace: Tracing | None


_OFF: AbstractContextManager[None] = nullcontext()


class AutoTracing:
    """Resolves, at the first session, whether this router's sessions get spans.

    Nobody configured an OpenTelemetry provider without importing OpenTelemetry, so
    when ``opentelemetry.trace`` is not loaded, nothing is imported and tracing stays
    off. Otherwise the global tracer provider decides: the API's proxy or no-op
    provider (nothing configured, or ``OTEL_SDK_DISABLED``) means off. A provider set
    after the first session is not seen: call ``replica_router.otel.instrument()``.
    """

    __slots__ = ("_owner",)

    def __init__(self, owner: Traced) -> None:
        self._owner = owner

    def resolve(self) -> Tracing | None:
        """Decide once; the owner holds the answer from then on."""
        tracing: Tracing | None = None
        if "opentelemetry.trace" in sys.modules:
            from ._otel import from_global_provider

            tracing = from_global_provider()
        self._owner.trace = tracing
        return tracing

    def reader(
        self, policy: ReadPolicy, topology: Topology
    ) -> AbstractContextManager[CheckoutSpan | None]:
        tracing = self.resolve()
        return _OFF if tracing is None else tracing.reader(policy, topology)

    def writer(self, node: Node) -> AbstractContextManager[CheckoutSpan | None]:
        tracing = self.resolve()
        return _OFF if tracing is None else tracing.writer(node)

    def commit(self, node: Node) -> AbstractContextManager[object]:
        tracing = self.resolve()
        return _OFF if tracing is None else tracing.commit(node)
