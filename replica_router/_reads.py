"""Where a read goes: replica fitness, selection (with WAL positions), the fallback guard.

This is the one place a read is routed. :meth:`Reads.session` picks a node for
the read's policy and the client's position, checks a connection out on it, and
moves on to the next node when one is down, behind or full:

1. replicas fit to serve (up, in recovery, within the lag bounds; slow ones last);
2. with a position to honour: those known to have replayed it, or not checked for
   a while (re-read once); if none has it, wait on the most advanced one for up to
   ``consistency_wait``;
3. the primary, if the fallback is allowed and under its cap, else a 503.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from ._checkout import Checkout, CheckoutFailed, Prove, Skip, abort, raw_connection
from ._consistency import (
    REPLAY_LSN_SQL,
    ConsistencyState,
    PrimaryPosition,
    ReadPolicy,
    ReadYourWrites,
    TokenCodec,
    current_state,
)
from ._exceptions import ConfigurationError, ConsistencyTimeoutError, NoHealthyReplicaError
from ._nodes import Node, Role, Topology
from ._retry import EJECTS_REPLICA, classify
from ._selection import Selector
from ._settings import RouterSettings
from ._status import ReadPolicyStatus
from ._tracing import CheckoutSpan

__all__ = ["ReaderScope", "Reads"]

logger = logging.getLogger("replica_router")

# A replica found behind is not asked again for this long (it is known behind).
_RECHECK_AFTER = 0.05


class _Behind(Skip):
    """The replica did not replay the position a read needs within the wait bound."""


class _Check(enum.Enum):
    """How a read checks that a replica replayed the client's position."""

    NO = 0  # known from a probe or an earlier check
    ONCE = 1  # re-read it; if behind, try another replica
    WAIT = 2  # re-read it until it catches up or consistency_wait is over


class Reads:
    """Routes reader sessions.

    Args:
        topology: the nodes.
        settings: lag bounds, fallback, waits.
        checkout: opens proven sessions.
        selector: the strategy among fit replicas.
        codec: reads consistency tokens.
        position: the primary's known WAL position (tokens beyond it are ignored).
        probing: whether health probes run (without them a down replica is retried
            after one interval).
        pool_size: the primary's connections (pool plus overflow); without the
            ``fallback_max_in_flight`` setting, fallback reads may use half of them.
    """

    __slots__ = (
        "_checkout",
        "_codec",
        "_position",
        "_probing",
        "_selector",
        "_settings",
        "_topology",
        "default_policy",
        "fallback_cap",
        "fallback_in_flight",
        "policies",
    )

    def __init__(
        self,
        topology: Topology,
        settings: RouterSettings,
        checkout: Checkout,
        selector: Selector,
        codec: TokenCodec,
        position: PrimaryPosition,
        probing: Callable[[], bool],
        pool_size: int,
    ) -> None:
        self._topology = topology
        self._settings = settings
        self._checkout = checkout
        self._selector = selector
        self._codec = codec
        self._position = position
        self._probing = probing
        cap = settings.fallback_max_in_flight
        self.fallback_cap = cap if cap is not None else max(1, pool_size // 2)
        self.fallback_in_flight = 0
        self.default_policy = ReadPolicy("default", settings.read_your_writes)
        self.policies: dict[tuple[str | None, float | None], ReadPolicy] = {
            (None, None): self.default_policy
        }

    # -- policies ----------------------------------------------------------------------

    def policy(self, read_your_writes: ReadYourWrites | None, max_lag: float | None) -> ReadPolicy:
        """The policy for these overrides (made once, then shared).

        Raises:
            ConfigurationError: a bad value, or ``"lsn"`` while the router's mode is not.
        """
        policy = self.policies.get((read_your_writes, max_lag))
        if policy is not None:
            return policy
        settings = self._settings
        mode = read_your_writes if read_your_writes is not None else settings.read_your_writes
        if mode not in ("off", "request", "lsn"):
            raise ConfigurationError(
                f"read_your_writes must be 'off', 'request' or 'lsn', got {mode!r}"
            )
        if mode == "lsn" and settings.read_your_writes != "lsn":
            raise ConfigurationError(
                "read_your_writes='lsn' on a read needs REPLICA_ROUTER_READ_YOUR_WRITES=lsn: "
                "only then do writers record their WAL position"
            )
        if max_lag is not None and not max_lag >= 0:
            raise ConfigurationError(f"max_lag_seconds must be >= 0, got {max_lag!r}")
        parts = [] if read_your_writes is None else [f"read_your_writes={mode}"]
        if max_lag is not None:
            parts.append(f"max_lag_seconds={max_lag:g}")
        policy = ReadPolicy(",".join(parts), mode, max_lag)
        self.policies[(read_your_writes, max_lag)] = policy
        return policy

    def policy_status(self) -> tuple[ReadPolicyStatus, ...]:
        """Every policy used so far, with how often each decision was taken and the
        lag bounds in force (a route's own ``max_lag_seconds`` replaces both)."""
        s = self._settings
        return tuple(
            ReadPolicyStatus(
                name=p.name,
                read_your_writes=p.read_your_writes,
                max_lag_seconds=(
                    s.max_lag_seconds if p.max_lag_seconds is None else p.max_lag_seconds
                ),
                decisions=dict(p.decisions),
                max_lag_bytes=s.max_lag_bytes if p.max_lag_seconds is None else None,
            )
            for p in self.policies.values()
        )

    def state_for(self, token: str | None, policy: ReadPolicy) -> ConsistencyState | None:
        """What a read must see: the current request's, or a job's explicit token."""
        state = current_state()
        if token is None:
            return state
        claimed = self._codec.decode(token)
        if claimed is None:
            policy.decisions["token_ignored"] += 1
        return ConsistencyState(
            client_lsn=claimed or 0,
            own_lsn=state.own_lsn if state is not None else 0,
            wrote=state.wrote if state is not None else False,
        )

    # -- sessions ----------------------------------------------------------------------

    def scope(
        self, token: str | None, read_your_writes: ReadYourWrites | None, max_lag: float | None
    ) -> ReaderScope:
        """A reader session with these overrides, for the current request or task (or
        the write behind ``token``)."""
        if read_your_writes is None and max_lag is None:
            policy = self.default_policy
        else:
            policy = self.policy(read_your_writes, max_lag)
        state = current_state() if token is None else self.state_for(token, policy)
        return ReaderScope(self, [], policy, state)

    def default_scope(self) -> ReaderScope:
        """``scope(None, None, None)``: a read of the default policy."""
        return ReaderScope(self, [], self.default_policy, current_state())

    def session(
        self, tried: list[Node], policy: ReadPolicy, state: ConsistencyState | None
    ) -> ReaderScope:
        """A read-only session on the node this read is routed to.

        ``tried`` collects the nodes attempted (``run_read`` moves on from them).
        """
        return ReaderScope(self, tried, policy, state)

    async def _checkout_reader(
        self,
        tried: list[Node],
        policy: ReadPolicy,
        state: ConsistencyState | None,
        span: CheckoutSpan | None = None,
    ) -> tuple[AsyncSession, Node, bool]:
        """A proven session, its node, and whether it is a fallback read (counted)."""
        need = 0
        to_primary: str | None = None
        if state is not None and policy.read_your_writes != "off":
            if policy.read_your_writes == "request":
                if state.wrote:
                    to_primary = "primary_after_write"
            else:
                if state.client_lsn and not state.verified:
                    await self._verify_client_lsn(state, policy)
                need = max(state.client_lsn, state.own_lsn)
        topology = self._topology
        forgiven: list[Node] = []

        async def attempt(number: int) -> tuple[AsyncSession, Node, bool]:
            nonlocal to_primary
            while True:
                if to_primary is not None:
                    node, check = self._primary_for_consistency(tried, to_primary), _Check.NO
                else:
                    node, check = self.pick(tried, policy.max_lag_seconds, need)
                tried.append(node)
                if number > 1:
                    node.state.retries += 1
                    number = 1  # count a retry once, not per replica found behind
                # A read on the primary while replicas are configured: counted
                # against the cap.
                fallback = node is topology.primary and bool(topology.replicas)
                if fallback:
                    self.fallback_in_flight += 1
                try:
                    session, decision = await self._checkout.open(
                        node,
                        node.reader_sessionmaker,
                        None if check is _Check.NO else self._replay_check(need, check, span),
                        span,
                    )
                except BaseException as exc:
                    if fallback:
                        self.fallback_in_flight -= 1
                    if isinstance(exc, CheckoutFailed) and exc.blameless and node not in forgiven:
                        # The event loop was blocked, not the node: it may be tried again.
                        forgiven.append(node)
                        tried.remove(node)
                    if not isinstance(exc, Skip):
                        raise
                    if span is not None:
                        span.failed_attempt(node, None)
                    # Behind, or promoted: skipped for this read (it stays in ``tried``).
                    if check is _Check.WAIT and isinstance(exc, _Behind):
                        to_primary = "primary_behind"
                    continue
                if node is topology.primary:
                    decision = to_primary or "primary_fallback"
                policy.decisions[decision] += 1
                if span is not None:
                    span.chosen(node, decision)
                return session, node, fallback

        try:
            return await self._checkout.with_retries(
                attempt, self._settings.checkout_attempts + len(topology.replicas)
            )
        except CheckoutFailed as exc:
            raise NoHealthyReplicaError(
                f"no node could serve a read (last: {exc.node.name}, {type(exc.error).__name__})",
                retry_after=self._settings.health_interval,
            ) from exc.error

    # -- choosing a node ---------------------------------------------------------------

    def fit_replicas(self, max_lag: float | None = None) -> list[Node]:
        """Replicas fit to serve a read with this lag bound (slow ones only if no other)."""
        fit: list[Node] = []
        slow: list[Node] = []
        for node in self._topology.replicas:
            state = node.state
            if not state.up and not self._usable(node):
                continue
            if state.in_recovery is False:
                continue
            if max_lag is None:
                if state.lagging:
                    continue
            elif (state.lag_seconds or 0.0) > max_lag:
                continue
            (slow if state.slow else fit).append(node)
        return fit or slow

    def _usable(self, node: Node) -> bool:
        """Up, or down without probes to readmit it for over an interval (worth a try)."""
        state = node.state
        if state.up:
            return True
        if self._probing() or state.down_since is None:
            return False
        return time.monotonic() - state.down_since >= self._settings.health_interval

    def pick(self, tried: Sequence[Node], max_lag: float | None, need: int) -> tuple[Node, _Check]:
        """The node for the next read attempt, and how its position must be checked.

        With ``need`` (a WAL position): the selector picks among replicas known to
        have replayed it and those not checked for a while (which are checked, not
        waited for). If none is known to have it, the most advanced replica is
        checked and waited for.
        """
        candidates = self.fit_replicas(max_lag)
        if tried:
            candidates = [n for n in candidates if n not in tried]
        if candidates:
            if not need:
                return self._selector.select(candidates), _Check.NO
            ready: list[Node] = []
            unknown: list[Node] = []
            recheck_before = time.monotonic() - _RECHECK_AFTER
            for node in candidates:
                if (node.state.replay_lsn or 0) >= need:
                    ready.append(node)
                elif node.state.replay_checked_at < recheck_before:
                    unknown.append(node)
            if ready:
                choice = self._selector.select(ready + unknown)
                return choice, _Check.NO if choice in ready else _Check.ONCE
            # Wait on the most advanced replica, or on one not checked lately: the
            # replica just waited on would otherwise always look the most advanced.
            best = max(candidates, key=lambda n: n.state.replay_lsn or 0)
            if best not in unknown:
                unknown.append(best)
            return self._selector.select(unknown), _Check.WAIT
        topology = self._topology
        if not topology.replicas:
            return topology.primary, _Check.NO
        return self._primary_for_reads(tried, "no replica is fit to serve reads"), _Check.NO

    def _primary_for_reads(self, tried: Sequence[Node], why: str) -> Node:
        """The primary as a reader, if the settings and the fallback cap allow it."""
        settings = self._settings
        primary = self._topology.primary
        if not settings.fallback_to_primary:
            raise NoHealthyReplicaError(
                f"{why} and fallback to the primary is off", retry_after=settings.health_interval
            )
        if primary in tried or not self._usable(primary):
            # Known down: refused at once, not after a BEGIN that cannot be answered.
            raise NoHealthyReplicaError(
                f"{why} and the primary is unreachable", retry_after=settings.health_interval
            )
        if self.fallback_in_flight >= self.fallback_cap:
            raise NoHealthyReplicaError(
                f"{why} and the primary already serves {self.fallback_cap} reads "
                "(the cap that protects it)",
                retry_after=settings.health_interval,
            )
        logger.debug("%s; reading from the primary", why)
        return primary

    def _primary_for_consistency(self, tried: Sequence[Node], decision: str) -> Node:
        settings = self._settings
        why = (
            "this request wrote (read_your_writes=request)"
            if decision == "primary_after_write"
            else f"no replica replayed the client's last write within {settings.consistency_wait} s"
        )
        if not settings.fallback_to_primary:
            raise ConsistencyTimeoutError(
                f"{why}, and fallback to the primary is off",
                retry_after=settings.health_interval,
            )
        return self._primary_for_reads(tried, why)

    # -- WAL positions -----------------------------------------------------------------

    async def _verify_client_lsn(self, state: ConsistencyState, policy: ReadPolicy) -> None:
        """Check the client's claimed position once: beyond the primary's, it is dropped."""
        state.verified = True
        if not self._usable(self._topology.primary):
            # Not checkable while the primary is away: the position is still honoured
            # (replicas that replayed it serve; else a bounded wait, then a 503).
            return
        if state.client_lsn > self._position.known():
            current = await self._position.current()
            if current is None or state.client_lsn > current:
                # Forged, from another cluster, or not checkable now: never trusted.
                logger.debug("ignoring a client WAL position beyond the primary's")
                state.client_lsn = 0
                policy.decisions["token_ignored"] += 1

    def _replay_check(self, need: int, check: _Check, span: CheckoutSpan | None = None) -> Prove:
        async def prove(node: Node, conn: AsyncConnection) -> str:
            # Reading the position proves the connection: BEGIN can stay lazy.
            started = time.perf_counter()
            try:
                return await self._await_replay(node, conn, need, check is _Check.WAIT)
            finally:
                if span is not None:
                    span.replay_checked(node, time.perf_counter() - started)

        return prove

    async def _await_replay(self, node: Node, conn: AsyncConnection, need: int, wait: bool) -> str:
        """Re-read the replica's replay position until it reaches ``need`` or time is up."""
        driver_connection = (await raw_connection(conn)).driver_connection
        timeout = self._checkout.begin_bound(node)
        state = node.state
        deadline = time.monotonic() + (self._settings.consistency_wait if wait else 0.0)
        pause = 0.002
        waited = False
        while True:
            lsn = await node.driver.fetch_value(driver_connection, REPLAY_LSN_SQL, timeout)
            if lsn is None:  # not in recovery: a promoted "replica"
                raise _Behind()
            lsn = int(lsn)
            state.replay_checked_at = time.monotonic()
            if lsn > (state.replay_lsn or 0):
                state.replay_lsn = lsn
            if lsn >= need:
                return "replica_after_wait" if waited else "replica_after_check"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Behind()
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.02)
            waited = True


class ReaderScope(AbstractAsyncContextManager[AsyncSession]):
    """``async with`` a reader session: checked out on entry, released on exit; an
    error that says the replica is lost (or hung past ``READ_TIMEOUT``) ejects it and
    drops the connection instead of rolling it back. A class, not a generator: every
    read goes through it."""

    __slots__ = ("_fallback", "_node", "_policy", "_reads", "_session", "_state", "_tried")

    def __init__(
        self,
        reads: Reads,
        tried: list[Node],
        policy: ReadPolicy,
        state: ConsistencyState | None,
    ) -> None:
        self._reads = reads
        self._tried = tried
        self._policy = policy
        self._state = state

    async def __aenter__(self) -> AsyncSession:
        reads = self._reads
        trace = reads._checkout.trace
        if trace is None:
            checked_out = await reads._checkout_reader(self._tried, self._policy, self._state)
        else:
            with trace.reader(self._policy, reads._topology) as span:
                checked_out = await reads._checkout_reader(
                    self._tried, self._policy, self._state, span
                )
        session, node, self._fallback = checked_out
        node.state.sessions += 1
        self._session, self._node = session, node
        return session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        reads, node, session = self._reads, self._node, self._session
        try:
            if isinstance(exc, Exception) and node.role is Role.REPLICA:
                kind = classify(exc)
                if kind in EJECTS_REPLICA:
                    # Lost, or hung past READ_TIMEOUT: no more reads there until probes
                    # readmit it, and this connection is dropped, not rolled back.
                    reads._checkout.note_failure(node, exc, kind)
                    await abort(node, session)
        finally:
            if self._fallback:
                reads.fallback_in_flight -= 1
            await reads._checkout.release(node, session)  # a reader holds nothing else
