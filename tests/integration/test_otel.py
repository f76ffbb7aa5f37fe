"""Routing decisions on the trace, and metrics from router.status(), on a real cluster.

Spans are read back with the SDK's in-memory exporter, metrics with its in-memory
reader; nothing here sets a global provider (the process may hold only one).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import Depends, FastAPI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from replica_router import (
    PrimaryUnavailableError,
    ReadYourWritesMiddleware,
    ReplicaRouter,
    RouterSettings,
)
from replica_router._nodes import CHECKOUT_BUCKETS
from replica_router.otel import METRICS, instrument, uninstrument
from replica_router.testing import LocalCluster

pytestmark = pytest.mark.integration

FAST = RouterSettings.defaults(health_interval=0.2, health_timeout=1.0)


class Otel:
    """An SDK tracer provider and meter provider that keep what they record."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def instrument(self, router: ReplicaRouter, **options: Any) -> None:
        instrument(
            router,
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
            **options,
        )

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        found = self.exporter.get_finished_spans()
        return [s for s in found if name is None or s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.spans(name)
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]

    def clear(self) -> None:
        self.exporter.clear()

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def otel() -> Iterator[Otel]:
    recorder = Otel()
    yield recorder
    recorder.shutdown()


@pytest_asyncio.fixture
async def router(replica_cluster: LocalCluster, otel: Otel) -> AsyncIterator[ReplicaRouter]:
    router = ReplicaRouter(replica_cluster.primary_url, replica_cluster.replica_urls, settings=FAST)
    otel.instrument(router)
    async with router:
        yield router


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def port_of(cluster: LocalCluster, name: str) -> int:
    return next(n.port for n in cluster.nodes if n.name == name)


async def select_one(router: ReplicaRouter, **options: Any) -> None:
    async with router.reader_session(**options) as db:
        await db.execute(text("SELECT 1"))


async def wait_until(condition: Any, seconds: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


# -- spans ------------------------------------------------------------------------------


async def test_a_read_on_a_replica(
    router: ReplicaRouter, otel: Otel, replica_cluster: LocalCluster
) -> None:
    await select_one(router)
    span = otel.one("replica_router.reader")
    a = attributes(span)
    assert span.kind is SpanKind.INTERNAL
    assert span.status.status_code is StatusCode.UNSET
    assert a["replica_router.node"] in {"replica-1", "replica-2"}
    assert a["db.system.name"] == "postgresql"
    assert a["server.address"] == "127.0.0.1"
    assert a["server.port"] == port_of(replica_cluster, a["replica_router.node"])
    assert a["db.namespace"] == router.primary.url.database
    assert a["replica_router.intent"] == "reader"
    assert a["replica_router.node.role"] == "replica"
    assert a["replica_router.decision"] == "replica"
    assert a["replica_router.attempts"] == 1
    assert a["replica_router.policy"] == "default"
    assert a["replica_router.read_your_writes"] == "lsn"
    assert a["replica_router.node.lag_seconds"] >= 0.0
    assert a["replica_router.node.lag_bytes"] >= 0
    assert "replica_router.skipped" not in a
    assert "replica_router.replay_wait" not in a
    assert not span.events


async def test_a_read_after_the_clients_write_waits_for_replay(
    replica_cluster: LocalCluster, otel: Otel
) -> None:
    settings = RouterSettings.defaults(
        health_interval=0.2, health_timeout=1.0, consistency_wait=10.0
    )
    router = ReplicaRouter(
        replica_cluster.primary_url, replica_cluster.replica_urls, settings=settings
    )
    otel.instrument(router)
    async with router:
        replica_cluster.execute("primary", "CREATE TABLE IF NOT EXISTS otel_w (x int)")
        replica_cluster.wait_for_replay()
        for replica in replica_cluster.replicas:
            replica_cluster.pause_replay(replica.name)
        async with router.writer_session() as db:
            await db.execute(text("INSERT INTO otel_w VALUES (1)"))
        token = router.consistency_token()
        assert token is not None

        # The replicas catch up while the read waits for them.
        def resume_all() -> None:
            for replica in replica_cluster.replicas:
                replica_cluster.resume_replay(replica.name)

        resume = threading.Timer(0.4, resume_all)
        resume.start()
        try:
            otel.clear()
            await select_one(router, consistency_token=token)
        finally:
            resume.join()
    writer = attributes(otel.one("replica_router.reader"))
    assert writer["replica_router.decision"] == "replica_after_wait"
    assert writer["replica_router.node.role"] == "replica"
    assert writer["replica_router.replay_wait"] >= 0.2
    assert writer["replica_router.attempts"] == 1


async def test_a_fallback_to_the_primary_names_the_replicas_and_why(
    replica_cluster: LocalCluster, otel: Otel
) -> None:
    # Any replayed byte behind is too far: pausing replay makes both replicas unfit.
    settings = RouterSettings.defaults(health_interval=0.2, health_timeout=1.0, max_lag_bytes=1)
    router = ReplicaRouter(
        replica_cluster.primary_url, replica_cluster.replica_urls, settings=settings
    )
    otel.instrument(router)
    async with router:
        for replica in replica_cluster.replicas:
            replica_cluster.pause_replay(replica.name)
        replica_cluster.execute(
            "primary", "CREATE TABLE IF NOT EXISTS otel_f (x int); INSERT INTO otel_f VALUES (1)"
        )
        await wait_until(lambda: all(not r.healthy for r in router.status().nodes[1:]))
        otel.clear()
        await select_one(router)
    span = otel.one("replica_router.reader")
    a = attributes(span)
    assert a["replica_router.decision"] == "primary_fallback"
    assert a["replica_router.node"] == "primary"
    assert a["replica_router.node.role"] == "primary"
    assert a["server.port"] == port_of(replica_cluster, "primary")
    assert sorted(a["replica_router.skipped"]) == ["replica-1 (lagging)", "replica-2 (lagging)"]
    assert span.status.status_code is StatusCode.UNSET


async def test_a_dead_replica_is_skipped_and_the_span_says_why(
    replica_cluster: LocalCluster, otel: Otel
) -> None:
    # No probes: only the read itself can find out that replica-2 is gone.
    router = ReplicaRouter(replica_cluster.primary_url, replica_cluster.replica_urls, settings=FAST)
    otel.instrument(router)
    replica_cluster.kill_node("replica-2")
    try:
        for _ in range(2):  # round robin: one of the first two reads picks replica-2
            await select_one(router)
        hit = [
            s
            for s in otel.spans("replica_router.reader")
            if any(e.name == "replica_router.attempt_failed" for e in s.events)
        ]
        assert len(hit) == 1
        a = attributes(hit[0])
        assert a["replica_router.node"] == "replica-1"
        assert a["replica_router.decision"] == "replica"
        assert a["replica_router.attempts"] == 2
        (skipped,) = a["replica_router.skipped"]
        assert skipped.startswith("replica-2 (connection: ")
        (event,) = hit[0].events
        assert event.attributes is not None
        assert event.attributes["replica_router.node"] == "replica-2"
        assert str(event.attributes["replica_router.reason"]).startswith("connection: ")
        # From then on the router knows: replica-2 is left out before any attempt.
        otel.clear()
        await select_one(router)
        b = attributes(otel.one("replica_router.reader"))
        assert b["replica_router.attempts"] == 1
        (skipped,) = b["replica_router.skipped"]
        assert skipped.startswith("replica-2 (down: connection: ")
    finally:
        await router.close()


async def test_a_failed_commit_sets_the_error_status(
    replica_cluster: LocalCluster, router: ReplicaRouter, otel: Otel
) -> None:
    replica_cluster.execute(
        "primary",
        "DROP TABLE IF EXISTS otel_items; CREATE TABLE otel_items (k text, "
        "CONSTRAINT otel_items_k UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)",
    )
    async with router.writer_session() as db:
        await db.execute(text("INSERT INTO otel_items VALUES ('a')"))
    otel.clear()
    with pytest.raises(Exception, match="otel_items_k"):
        async with router.writer_session() as db:
            await db.execute(text("INSERT INTO otel_items VALUES ('a')"))  # fails at COMMIT
    writer = otel.one("replica_router.writer")
    assert attributes(writer)["replica_router.decision"] == "primary"
    assert writer.status.status_code is StatusCode.UNSET
    commit = otel.one("replica_router.commit")
    a = attributes(commit)
    assert commit.status.status_code is StatusCode.ERROR
    assert commit.status.description == "other: IntegrityError"
    assert a["error.type"] == "23505"
    assert a["db.response.status_code"] == "23505"
    assert a["replica_router.error"] == "other"
    assert a["replica_router.node"] == "primary"
    assert a["server.port"] == port_of(replica_cluster, "primary")
    # Nothing of the statement (nor its parameters) reaches the span.
    assert "otel_items" not in repr(commit.to_json())


async def test_a_failed_checkout_sets_the_error_status_with_the_reason(otel: Otel) -> None:
    settings = RouterSettings.defaults(checkout_attempts=2, retry_backoff=0.01)
    router = ReplicaRouter("postgresql://app:secret@127.0.0.1:9/app", settings=settings)
    otel.instrument(router)
    try:
        with pytest.raises(PrimaryUnavailableError):
            async with router.writer_session():
                pass
    finally:
        await router.close()
    span = otel.one("replica_router.writer")
    a = attributes(span)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description is not None
    assert span.status.description.startswith("connection: the primary is unreachable")
    assert a["error.type"] == "replica_router.PrimaryUnavailableError"
    assert a["replica_router.error"] == "connection"
    assert a["replica_router.attempts"] == 2
    assert len(a["replica_router.skipped"]) == 2
    assert "secret" not in repr(span.to_json())


async def test_uninstrumented_and_unconfigured_routers_make_no_spans(
    replica_cluster: LocalCluster, otel: Otel
) -> None:
    router = ReplicaRouter(replica_cluster.primary_url, replica_cluster.replica_urls, settings=FAST)
    otel.instrument(router)
    uninstrument(router)
    await select_one(router)
    assert router._checkout.trace is None
    plain = ReplicaRouter(replica_cluster.primary_url, replica_cluster.replica_urls, settings=FAST)
    await select_one(plain)  # no global provider in this process: resolved once, to off
    assert plain._checkout.trace is None
    await router.close()
    await plain.close()
    assert otel.spans() == []


# -- nesting under FastAPI's and SQLAlchemy's own instrumentation ------------------------


def notes_app(router: ReplicaRouter, **fastapi_options: Any) -> FastAPI:
    app = FastAPI(**fastapi_options)
    app.add_middleware(ReadYourWritesMiddleware, router=router)
    # Defaults, not Annotated aliases: this module's annotations are strings, and
    # FastAPI resolves them in the module's namespace.

    @app.post("/write")
    async def write(db: AsyncSession = Depends(router.writer)) -> dict[str, int]:
        await db.execute(text("INSERT INTO otel_n VALUES (1)"))
        return {"ok": 1}

    # Reads that ignore the client's writes prove their connection with BEGIN always
    # (a read after a write may re-read a replica's position instead).
    @app.get("/read")
    async def read(
        db: AsyncSession = Depends(router.reader_with(read_your_writes="off")),
    ) -> dict[str, int]:
        return {"n": (await db.execute(text("SELECT count(*) FROM otel_n"))).scalar_one()}

    return app


def scope_of(span: ReadableSpan) -> str | None:
    return span.instrumentation_scope.name if span.instrumentation_scope else None


def client_spans(spans: Sequence[ReadableSpan]) -> list[tuple[str, SpanKind]]:
    return sorted((s.name, s.kind) for s in spans if s.kind is SpanKind.CLIENT)


@pytest.mark.parametrize("server", ["fastapi-native", "fastapi-instrumentation"])
async def test_spans_nest_under_the_request_and_leave_statements_to_sqlalchemy(
    replica_cluster: LocalCluster, router: ReplicaRouter, otel: Otel, server: str
) -> None:
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    replica_cluster.execute("primary", "CREATE TABLE IF NOT EXISTS otel_n (x int)")
    replica_cluster.wait_for_replay()
    provider = otel.tracer_provider
    if server == "fastapi-native":
        app = notes_app(router, telemetry={"tracer_provider": provider, "metrics": False})
    else:
        app = notes_app(router, telemetry={"tracing": False, "metrics": False})
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    engines = [node.engine.sync_engine for node in router.nodes]
    # Its declared range stops below SQLAlchemy 2.1, which it traces all the same.
    SQLAlchemyInstrumentor().instrument(
        engines=engines, tracer_provider=provider, skip_dep_check=True
    )
    asyncpg_instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    asyncpg_instrumentor.instrument(tracer_provider=provider)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            # The same requests without the router's spans, then with them (after a
            # warm-up: a new connection runs the driver's own queries).
            instrument(router, tracing=False, metrics=False)
            for _ in range(3):
                assert (await client.post("/write")).status_code == 200
                assert (await client.get("/read")).status_code == 200
            otel.clear()
            assert (await client.post("/write")).status_code == 200
            assert (await client.get("/read")).status_code == 200
            without = otel.spans()
            otel.clear()
            otel.instrument(router, metrics=False)
            assert (await client.post("/write")).status_code == 200
            assert (await client.get("/read")).status_code == 200
            with_ours = otel.spans()
    finally:
        asyncpg_instrumentor.uninstrument()
        SQLAlchemyInstrumentor().uninstrument()
        if server == "fastapi-instrumentation":
            FastAPIInstrumentor.uninstrument_app(app)
    # The router adds its three spans, all INTERNAL, and no statement span.
    ours = [s for s in with_ours if s.name.startswith("replica_router.")]
    by_name = {s.name: s for s in ours}
    assert sorted(s.name for s in ours) == [
        "replica_router.commit",
        "replica_router.reader",
        "replica_router.writer",
    ]
    assert all(s.kind is SpanKind.INTERNAL for s in ours)
    # Statements are traced by SQLAlchemy's and asyncpg's instrumentation only: every
    # CLIENT span is theirs, the router's spans carry no statement, and the kinds of
    # statement spans are those of the same requests without the router's spans.
    assert {scope_of(s) for s in with_ours if s.name in by_name} == {"replica_router"}
    assert all(scope_of(s) != "replica_router" for s in with_ours if s.kind is SpanKind.CLIENT)
    for span in ours:
        assert not {k for k in attributes(span) if k.startswith(("db.query", "db.statement"))}
    assert set(client_spans(with_ours)) == set(client_spans(without))
    assert {s.name for s in with_ours} - {s.name for s in without} == {s.name for s in ours}
    # Under the request's server span, in the request's trace.
    servers = {s.name: s for s in with_ours if s.kind is SpanKind.SERVER}
    assert set(servers) == {"POST /write", "GET /read"}
    ancestry = {name: ancestry_of(with_ours, span) for name, span in by_name.items()}
    assert "GET /read" in ancestry["replica_router.reader"]
    assert "POST /write" in ancestry["replica_router.writer"]
    assert "POST /write" in ancestry["replica_router.commit"]
    if server == "fastapi-native":
        assert ancestry["replica_router.reader"][0] == "fastapi.dependencies"
    trace_id = servers["GET /read"].context.trace_id
    assert by_name["replica_router.reader"].context.trace_id == trace_id
    # What the checkout sends to prove its connection (BEGIN) nests under the router's
    # span; COMMIT, and the WAL position read after it, under the commit span.
    assert "BEGIN;" in children(with_ours, by_name["replica_router.writer"])
    assert "BEGIN" in children(with_ours, by_name["replica_router.reader"])
    assert "COMMIT;" in children(with_ours, by_name["replica_router.commit"])
    # The endpoint's own statements are not the router's: its checkout span has ended.
    endpoint = [
        s
        for s in with_ours
        if s.kind is SpanKind.CLIENT
        and "GET /read" in ancestry_of(with_ours, s)
        and "replica_router.reader" not in ancestry_of(with_ours, s)
    ]
    assert [s.name for s in endpoint if s.name.startswith("SELECT")]


def ancestry_of(spans: Sequence[ReadableSpan], span: ReadableSpan) -> list[str]:
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    chain, parent = [], span.parent
    while parent is not None and parent.span_id in by_id:
        ancestor = by_id[parent.span_id]
        chain.append(ancestor.name)
        parent = ancestor.parent
    return chain


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[str]:
    assert parent.context is not None
    return sorted(
        s.name for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id
    )


# -- metrics ----------------------------------------------------------------------------


def points(data: MetricsData | None) -> dict[str, list[tuple[dict[str, Any], float]]]:
    out: dict[str, list[tuple[dict[str, Any], float]]] = {}
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "replica_router"
            for metric in scope.metrics:
                assert metric.unit == METRICS[metric.name][1]
                for point in metric.data.data_points:
                    value = point.value  # type: ignore[union-attr]
                    out.setdefault(metric.name, []).append((dict(point.attributes or {}), value))
    return out


def value(found: list[tuple[dict[str, Any], float]], **match: Any) -> float:
    hits = [v for a, v in found if all(a.get(k) == want for k, want in match.items())]
    assert len(hits) == 1, (match, found)
    return hits[0]


async def test_metrics_are_read_from_router_status(
    replica_cluster: LocalCluster, router: ReplicaRouter, otel: Otel
) -> None:
    replica_cluster.execute("primary", "CREATE TABLE IF NOT EXISTS otel_m (x int)")
    for _ in range(5):
        await select_one(router)
    async with router.writer_session() as db:
        await db.execute(text("INSERT INTO otel_m VALUES (1)"))
    await select_one(router, read_your_writes="off", max_lag_seconds=30)
    await wait_until(lambda: all(n.lag_seconds is not None for n in router.status().nodes[1:]))
    found = points(otel.reader.get_metrics_data())
    status = router.status()
    assert set(found) == set(METRICS)
    key = "replica_router.node"
    for node in status.nodes:
        n = {key: node.name, "replica_router.node.role": node.role}
        assert value(found["replica_router.node.sessions"], **n) == node.sessions
        assert value(found["replica_router.node.healthy"], **n) == float(node.healthy)
        assert value(found["replica_router.node.ejections"], **n) == node.ejections
        assert value(found["replica_router.node.retries"], **n) == node.retries
        assert value(found["replica_router.node.failovers"], **n) == node.failovers
        assert value(found["replica_router.checkout.failures"], **n) == node.checkout_failures
        used = value(
            found["db.client.connection.count"],
            **n,
            **{"db.client.connection.pool.name": node.name},
        )
        assert used == node.in_flight == 0
        assert value(found["replica_router.checkout.duration"], **n) == pytest.approx(
            node.checkout_seconds
        )
        cumulative = 0
        for bound, count in zip(
            (*map(str, CHECKOUT_BUCKETS), "+Inf"), node.checkout_histogram, strict=True
        ):
            cumulative += count
            assert value(found["replica_router.checkout.count"], **n, le=bound) == cumulative
        assert cumulative == sum(node.checkout_histogram) > 0
        if node.role == "replica":
            assert value(found["replica_router.replica.lag"], **n) == node.lag_seconds
            assert value(found["replica_router.replica.lag.size"], **n) == node.lag_bytes
        else:
            assert [a for a, _ in found["replica_router.replica.lag"] if a[key] == node.name] == []
    for policy in status.reads:
        for decision, count in policy.decisions.items():
            got = value(
                found["replica_router.read.decisions"],
                **{"replica_router.policy": policy.name, "replica_router.decision": decision},
            )
            assert got == count
    assert sum(p.decisions["replica"] for p in status.reads) == 6
    assert value(found["replica_router.fallback.in_flight"]) == status.fallback_in_flight
    assert value(found["replica_router.fallback.limit"]) == status.fallback_cap
    # Counted once: the next collection follows status(), not a second set of counters.
    await select_one(router)
    again = points(otel.reader.get_metrics_data())
    after = router.status()
    assert (
        value(
            again["replica_router.read.decisions"],
            **{"replica_router.policy": "default", "replica_router.decision": "replica"},
        )
        == after.reads[0].decisions["replica"]
    )


async def test_two_routers_on_one_meter_provider_are_told_apart(
    replica_cluster: LocalCluster, otel: Otel
) -> None:
    a = ReplicaRouter(replica_cluster.primary_url, settings=FAST)
    b = ReplicaRouter(replica_cluster.primary_url, settings=FAST)
    otel.instrument(a, name="orders")
    otel.instrument(b, name="billing")
    async with a.writer_session():
        pass
    found = points(otel.reader.get_metrics_data())
    sessions = found["replica_router.node.sessions"]
    assert value(sessions, **{"replica_router.router": "orders"}) == 1
    assert value(sessions, **{"replica_router.router": "billing"}) == 0
    uninstrument(b)
    found = points(otel.reader.get_metrics_data())
    names = {a_.get("replica_router.router") for a_, _ in found["replica_router.node.sessions"]}
    assert names == {"orders"}
    await a.close()
    await b.close()
