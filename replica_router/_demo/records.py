"""What the demo records: each client request, each phase, and the router's log."""

import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .._status import RouterStatus

__all__ = ["EventLog", "Phase", "Request", "capture_router_logs"]


@dataclass(slots=True)
class Request:
    """One request made by a demo client."""

    kind: str  # "read" or "write"
    started: float
    finished: float
    node: str | None  # the server that answered; None on error
    error: str | None = None
    expected: bool = False  # an error the phase's fault explains


@dataclass(slots=True)
class Phase:
    """One step of the demo: an optional fault, then traffic, then a verdict."""

    title: str
    expectation: str
    share: float
    action: Callable[[], None] | None = None
    # When the router's status first showed the expected reaction.
    observe: Callable[[RouterStatus], bool] | None = None
    started: float = 0.0
    action_done: float = 0.0
    ended: float = 0.0
    observed_at: float | None = None
    action_error: str | None = None
    max_lag_seconds: float = 0.0
    max_lag_bytes: int = 0
    requests: list[Request] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.started > 0 and self.ended == 0

    def reads_by(self, after: float | None = None) -> Counter[str]:
        """Successful reads per node, of requests started after ``after``."""
        return Counter(
            r.node
            for r in self.requests
            if r.kind == "read" and r.node is not None and (after is None or r.started > after)
        )


class EventLog(logging.Handler):
    """Keeps the router's log messages (node up, down, lagging...) for the display."""

    def __init__(self, events: deque[str], clock: Callable[[], float]) -> None:
        super().__init__(logging.INFO)
        self._events = events
        self._clock = clock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._events.append(f"{self._clock():6.1f}s  router: {record.getMessage()}")
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def capture_router_logs(handler: logging.Handler) -> Iterator[None]:
    logger = logging.getLogger("replica_router")
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # The display shows them; printed lines would tear the live table.
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
