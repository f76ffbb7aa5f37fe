"""Read-your-writes: WAL positions that follow a client, and how reads honour them.

After a writer commits, the router reads the primary's WAL insert position on the
same connection (``pg_current_wal_insert_lsn()``, one round trip, only when the
transaction ran statements). That position becomes a *token*: PostgreSQL's own
``pg_lsn`` text (``16/B374D848``), followed by ``.`` and an HMAC when a secret is
configured. :class:`ReadYourWritesMiddleware` sends it back as a cookie and a
response header and reads it from the next request; nothing is stored on the
server, so it works across workers and hosts.

A token is a claim, never trusted: a malformed one, one with a bad signature, or
one beyond the primary's current position is ignored.

Example::

    router = ReplicaRouter.from_env()            # READ_YOUR_WRITES=lsn by default
    app = FastAPI(lifespan=router.lifespan)      # installs the middleware

    # a background job carries the position explicitly:
    token = router.consistency_token()           # after a writer committed
    async with router.reader_session(consistency_token=token) as db: ...
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ._settings import RouterSettings

__all__ = [
    "DECISIONS",
    "REPLAY_LSN_SQL",
    "WAL_INSERT_LSN_SQL",
    "ConsistencyState",
    "PositionSource",
    "PrimaryPosition",
    "ReadPolicy",
    "ReadYourWritesMiddleware",
    "TokenCodec",
    "add_middleware",
    "current_state",
    "format_lsn",
    "install_middleware",
    "parse_lsn",
    "token_for",
]

logger = logging.getLogger("replica_router")

# WAL positions as plain integers (bytes since 0/0), whatever the driver makes of pg_lsn.
# After a COMMIT, the insert position covers it; but when the last record ended at a
# page boundary it points past the next page's header (24 bytes, 40 at a segment's
# start), which no replica ever reports as replayed: step back over that header.
WAL_INSERT_LSN_SQL = """
SELECT CASE WHEN l % seg = 40 THEN l - 40 WHEN l % page = 24 THEN l - 24 ELSE l END
FROM (SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint AS l,
             current_setting('wal_block_size')::bigint AS page,
             pg_size_bytes(current_setting('wal_segment_size')) AS seg) AS position
"""
REPLAY_LSN_SQL = "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint"

ReadYourWrites = Literal["off", "request", "lsn"]

# Where a read went and why; counted per read policy, shown by router.status().
DECISIONS = (
    "replica",  # no position to honour, or the replica was known to have it
    "replica_after_check",  # the replica's position was re-read and it had it
    "replica_after_wait",  # waited (within the bound) for the replica to replay it
    "primary_behind",  # no replica replayed it within the bound
    "primary_after_write",  # request mode: this request wrote
    "primary_fallback",  # no replica fit (down, lagging) or none configured
    "token_ignored",  # the client's position was malformed, forged or beyond the primary
)

_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_MAX_TOKEN = 80
_SIGNATURE_BYTES = 18  # 24 base64 characters


def format_lsn(lsn: int) -> str:
    """PostgreSQL's text form of a WAL position: ``16/B374D848``."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int | None:
    """The WAL position in ``text`` (``16/B374D848``), or None if it is not one."""
    match = _LSN.fullmatch(text)
    if match is None:
        return None
    return (int(match[1], 16) << 32) | int(match[2], 16)


class TokenCodec:
    """Turns WAL positions into tokens and back, signing them when given a secret."""

    __slots__ = ("_key",)

    def __init__(self, secret: bytes | None) -> None:
        self._key = secret

    def _sign(self, text: str) -> str:
        assert self._key is not None
        digest = hmac.new(self._key, text.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:_SIGNATURE_BYTES]).decode()

    def encode(self, lsn: int) -> str:
        text = format_lsn(lsn)
        return f"{text}.{self._sign(text)}" if self._key is not None else text

    def decode(self, token: str) -> int | None:
        """The position a token claims, or None if it is malformed or badly signed.

        Never raises: the input comes from clients.
        """
        if not token or len(token) > _MAX_TOKEN:
            return None
        text, _, signature = token.partition(".")
        if self._key is not None and not hmac.compare_digest(
            signature.encode(), self._sign(text).encode()
        ):
            return None
        lsn = parse_lsn(text)
        return lsn if lsn else None


@dataclass(slots=True, eq=False)
class ReadPolicy:
    """How a group of reads treats lag and the client's own writes.

    ``name`` shows in ``router.status()`` with how often each decision was taken.
    """

    name: str
    read_your_writes: ReadYourWrites
    max_lag_seconds: float | None = None
    decisions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DECISIONS, 0))


@dataclass(slots=True)
class ConsistencyState:
    """What one request (or one task) must see.

    Attributes:
        client_lsn: the position the client's token claims; not yet trusted.
        verified: ``client_lsn`` was checked against the primary (and zeroed if bad).
        own_lsn: the position covering this request's own commits.
        wrote: a writer committed statements during this request.
        lsn_missing: a commit's position could not be read on its connection.
        writer_closed: the request's ``router.writer`` session was committed and
            closed before the response (a streamed body cannot use it).
    """

    client_lsn: int = 0
    verified: bool = False
    own_lsn: int = 0
    wrote: bool = False
    lsn_missing: bool = False
    writer_closed: bool = False


class PrimaryPosition:
    """The primary's WAL position as far as this process knows it.

    Probes and commits feed it; :meth:`current` asks the primary, one query shared by
    the callers that arrive before it starts.

    Args:
        probed: the newest position the health probes saw.
        query: asks the primary for its WAL insert position now.
        timeout: bound on that query.
        observe: told of every commit's position (replica lag is measured against it).
    """

    __slots__ = ("_observe", "_probed", "_query", "_refresh", "_started", "_timeout", "written")

    def __init__(
        self,
        probed: Callable[[], int | None],
        query: Callable[[], Awaitable[Any]],
        timeout: float,
        observe: Callable[[int], None],
    ) -> None:
        self._probed = probed
        self._query = query
        self._timeout = timeout
        self._observe = observe
        self._refresh: asyncio.Task[int | None] | None = None
        self._started = 0  # queries started, to tell one begun before a call
        self.written = 0

    def known(self) -> int:
        """The newest position seen, without a query."""
        return max(self._probed() or 0, self.written)

    def committed(self, lsn: int) -> None:
        """A writer's commit reached ``lsn``."""
        if lsn > self.written:
            self.written = lsn
            self._observe(lsn)

    async def current(self) -> int | None:
        """The primary's WAL insert position now, or None if it cannot be read.

        Read by a query that started after this call: one already in flight may have
        read the position before the commit (or the token) the caller must cover, so
        a caller waits for it to end and then starts, or joins, the next one. The query
        runs in a task of its own: a caller that is cancelled takes nobody's answer
        with it.
        """
        asked = self._started
        while (pending := self._refresh) is not None:
            if self._started > asked:  # started after this call: it covers it
                return await asyncio.shield(pending)
            await asyncio.shield(pending)
        self._started += 1
        pending = self._refresh = asyncio.get_running_loop().create_task(self._read())
        return await asyncio.shield(pending)

    async def _read(self) -> int | None:
        try:
            lsn = int(await asyncio.wait_for(self._query(), self._timeout))
        except Exception:
            logger.debug("could not read the primary's WAL position", exc_info=True)
            return None
        finally:
            self._refresh = None
        self.written = max(self.written, lsn)
        return lsn


_STATE: contextvars.ContextVar[ConsistencyState | None] = contextvars.ContextVar(
    "replica_router_consistency", default=None
)


def current_state(create: bool = False) -> ConsistencyState | None:
    """The state of the current request or task; made (and kept) if ``create``."""
    state = _STATE.get()
    if state is None and create:
        state = ConsistencyState()
        _STATE.set(state)
    return state


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class PositionSource(Protocol):
    """What the middleware needs: settings, a token codec, a counter of bad tokens, and
    where to say that it is in place and what overrides an app has.

    A :class:`~replica_router.ReplicaRouter` is one.
    """

    @property
    def settings(self) -> RouterSettings: ...

    @property
    def codec(self) -> TokenCodec: ...

    def _note_rejected_token(self) -> None: ...

    def _note_middleware(self) -> None: ...

    def _check_overrides(self, overrides: Mapping[Any, Any]) -> None: ...


class ReadYourWritesMiddleware:
    """Carries the client's WAL position in and out of every HTTP request.

    In: the ``X-Replica-Router-LSN`` request header or the ``rr_lsn`` cookie (the
    newer position wins). Out, after a request whose writer committed: the same
    header and cookie with the new position. ``router.lifespan`` installs it; add
    it yourself (``app.add_middleware(ReadYourWritesMiddleware, router=router)``)
    when the lifespan does not run, e.g. under ``httpx.ASGITransport``.

    Whatever the mode, it also guards streamed responses: after a request's writer
    committed and closed its session, a response without a ``Content-Length`` (a
    ``StreamingResponse``) starts only with its first chunk, so a body that fails
    before it (one that uses the closed writer) is a 500, not an empty 200.
    """

    __slots__ = ("_app", "_cookie", "_cookie_suffix", "_header", "_positions", "_router")

    def __init__(self, app: ASGIApp, router: PositionSource) -> None:
        self._app = app
        self._router = router
        router._note_middleware()
        settings = router.settings
        self._positions = settings.read_your_writes != "off"
        self._header = settings.lsn_header.lower().encode("latin-1")
        self._cookie = settings.lsn_cookie
        self._cookie_suffix = (
            f"; Max-Age={settings.lsn_cookie_max_age}; Path=/; HttpOnly; SameSite=Lax"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        router = self._router
        overrides = getattr(scope.get("app"), "dependency_overrides", None)
        if overrides:  # a test suite's; an empty dict in production
            router._check_overrides(overrides)
        state = ConsistencyState(client_lsn=self._client_lsn(scope) if self._positions else 0)
        reset = _STATE.set(state)
        held: Message | None = None

        async def send_with_position(message: Message) -> None:
            nonlocal held
            if not (state.own_lsn or state.writer_closed or held is not None):
                await send(message)  # nothing written in this request: as it is
                return
            if message["type"] == "http.response.start":
                if state.own_lsn:
                    token = self._router.codec.encode(state.own_lsn)
                    cookie = f"{self._cookie}={token}{self._cookie_suffix}"
                    if scope.get("scheme") == "https":
                        cookie += "; Secure"
                    message = dict(message)
                    message["headers"] = [
                        *message.get("headers", ()),
                        (self._header, token.encode("latin-1")),
                        (b"set-cookie", cookie.encode("latin-1")),
                    ]
                if state.writer_closed and not _has_length(message):
                    held = message  # a stream after a write: it starts with its first chunk
                    return
            elif held is not None:
                start, held = held, None
                await send(start)
            await send(message)

        try:
            await self._app(scope, receive, send_with_position)
            if held is not None:
                await send(held)
        except Exception:
            if held is not None:
                # The stream failed before its first chunk: the client gets a 500 (the
                # server logs the error), never an empty 200.
                await send(_SERVER_ERROR_START)
                await send(_SERVER_ERROR_BODY)
            raise
        finally:
            _STATE.reset(reset)

    def _client_lsn(self, scope: Scope) -> int:
        headers = scope.get("headers", ())
        # Most requests carry neither: one pass in C tells (a dict of the headers).
        names = dict(headers)
        if self._header not in names and b"cookie" not in names:
            return 0
        best = 0
        rejected = False
        for name, value in headers:
            if name == self._header:
                claimed = self._router.codec.decode(value.decode("latin-1"))
            elif name == b"cookie":
                text = _cookie_value(value.decode("latin-1"), self._cookie)
                if text is None:
                    continue
                claimed = self._router.codec.decode(text)
            else:
                continue
            if claimed is None:
                rejected = True
            elif claimed > best:
                best = claimed
        if rejected and not best:
            self._router._note_rejected_token()
        return best


_SERVER_ERROR_START: Message = {
    "type": "http.response.start",
    "status": 500,
    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21")],
}
_SERVER_ERROR_BODY: Message = {"type": "http.response.body", "body": b"Internal Server Error"}


def _has_length(start: Message) -> bool:
    return any(name.lower() == b"content-length" for name, _ in start.get("headers", ()))


def add_middleware(app: Any, source: PositionSource) -> None:
    """``app.add_middleware(ReadYourWritesMiddleware, router=source)`` for an app that
    has not started, unless it has one already (tests without a lifespan)."""
    added = getattr(app, "user_middleware", ())
    if any(getattr(m, "cls", None) is ReadYourWritesMiddleware for m in added):
        return
    if getattr(app, "middleware_stack", None) is None and hasattr(app, "add_middleware"):
        app.add_middleware(ReadYourWritesMiddleware, router=source)


def token_for(state: ConsistencyState | None, codec: TokenCodec) -> str | None:
    """The token of the position ``state`` must see (its own commits or its client's)."""
    if state is None:
        return None
    lsn = max(state.own_lsn, state.client_lsn)
    return codec.encode(lsn) if lsn else None


def install_middleware(app: Any, source: PositionSource) -> None:
    """Wrap a started Starlette/FastAPI app's built middleware stack in the middleware
    (``app.add_middleware`` is refused once an app started); nothing if it is there."""
    added = getattr(app, "user_middleware", ())
    if any(getattr(m, "cls", None) is ReadYourWritesMiddleware for m in added):
        return
    if not hasattr(app, "middleware_stack") or not hasattr(app, "build_middleware_stack"):
        logger.warning(
            "cannot install ReadYourWritesMiddleware on %r; wrap the app in it",
            type(app).__name__,
        )
        return
    stack = app.middleware_stack
    if isinstance(stack, ReadYourWritesMiddleware):
        return
    if stack is None:  # the lifespan was run by hand (a test), not by the app
        stack = app.build_middleware_stack()
    app.middleware_stack = ReadYourWritesMiddleware(stack, source)


def _cookie_value(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None
