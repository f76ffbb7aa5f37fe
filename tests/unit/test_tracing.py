"""Tracing's switch and the spans' attributes, without a server.

The switch: off unless a real tracer provider is configured, decided once. The spans
are made here from fake routing reports, read back from the SDK's in-memory exporter.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider, StatusCode

from replica_router import (
    ConsistencyTimeoutError,
    NoHealthyReplicaError,
    PrimaryUnavailableError,
    ReplicaRouter,
)
from replica_router._consistency import ReadPolicy
from replica_router._otel import OtelTracing, error_type_of, reason_of
from replica_router._tracing import AutoTracing
from replica_router.otel import instrument, uninstrument

URL = "postgresql://app:secret@127.0.0.1:1/app"
REPLICAS = ["postgresql://app:secret@127.0.0.1:2/app", "postgresql://app:secret@127.0.0.1:3/app"]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def only(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = exporter.get_finished_spans()
    return span


# -- the switch -------------------------------------------------------------------------


def test_a_router_starts_undecided_and_decides_once() -> None:
    router = ReplicaRouter(URL)
    checkout = router._checkout
    assert isinstance(checkout.trace, AutoTracing)
    # No global provider in the test process: the API's proxy means off.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert checkout.trace.resolve() is None
    assert checkout.trace is None


def test_without_opentelemetry_loaded_nothing_is_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "opentelemetry.trace")
    monkeypatch.delitem(sys.modules, "replica_router._otel")
    router = ReplicaRouter(URL)
    assert isinstance(router._checkout.trace, AutoTracing)
    assert router._checkout.trace.resolve() is None
    assert "replica_router._otel" not in sys.modules


def test_a_configured_global_provider_turns_spans_on(
    monkeypatch: pytest.MonkeyPatch, provider: TracerProvider
) -> None:
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    router = ReplicaRouter(URL)
    auto = router._checkout.trace
    assert isinstance(auto, AutoTracing)
    tracing = auto.resolve()
    assert isinstance(tracing, OtelTracing)
    assert router._checkout.trace is tracing


def test_a_disabled_sdk_or_a_no_op_provider_keeps_spans_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    disabled = TracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: disabled)
    router = ReplicaRouter(URL)
    assert isinstance(router._checkout.trace, AutoTracing)
    assert router._checkout.trace.resolve() is None
    monkeypatch.setattr(trace, "get_tracer_provider", NoOpTracerProvider)
    other = ReplicaRouter(URL)
    assert isinstance(other._checkout.trace, AutoTracing)
    assert other._checkout.trace.resolve() is None


def test_instrument_and_uninstrument(provider: TracerProvider) -> None:
    router = ReplicaRouter(URL)
    instrument(router, tracer_provider=provider, metrics=False)
    assert isinstance(router._checkout.trace, OtelTracing)
    uninstrument(router)
    assert router._checkout.trace is None
    instrument(router, tracer_provider=NoOpTracerProvider(), metrics=False)
    assert router._checkout.trace is None
    # Without a provider: the global one, through the API's proxy (configured later).
    instrument(router, metrics=False)
    assert isinstance(router._checkout.trace, OtelTracing)
    instrument(router, tracing=False, metrics=False)
    assert router._checkout.trace is None


# -- what the spans say -----------------------------------------------------------------


def test_a_reader_span_names_its_node_and_the_replicas_left_out(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    router = ReplicaRouter(URL, REPLICAS)
    one, two = router.replicas
    two.state.reason = "down: connection: ConnectionRefusedError"
    one.state.lag_seconds, one.state.lag_bytes = 0.5, 1200
    tracing = OtelTracing(provider.get_tracer("test"))
    policy = ReadPolicy("default", "lsn")
    with tracing.reader(policy, router._topology) as span:
        span.failed_attempt(two, ConnectionRefusedError())
        span.failed_attempt(one, None)
        span.replay_checked(one, 0.125)
        span.chosen(one, "replica_after_wait")
    found = only(exporter)
    a = dict(found.attributes or {})
    assert found.name == "replica_router.reader"
    assert a["replica_router.node"] == "replica-1"
    assert a["server.port"] == 2
    assert a["db.namespace"] == "app"
    assert a["replica_router.decision"] == "replica_after_wait"
    assert a["replica_router.attempts"] == 3
    assert a["replica_router.replay_wait"] == 0.125
    assert a["replica_router.node.lag_seconds"] == 0.5
    assert a["replica_router.node.lag_bytes"] == 1200
    # Each node once: the attempt's reason, not also the status reason it left behind.
    assert a["replica_router.skipped"] == (
        "replica-2 (connection: ConnectionRefusedError)",
        "replica-1 (behind)",
    )
    assert [e.name for e in found.events] == ["replica_router.attempt_failed"] * 2


def test_a_read_with_its_own_lag_bound_judges_lag_by_it(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    router = ReplicaRouter(URL, REPLICAS)
    one, two = router.replicas
    one.state.reason, one.state.lag_seconds = "lagging", 20.0  # fit within 30 s
    two.state.reason, two.state.lag_seconds = "lagging", 40.0
    tracing = OtelTracing(provider.get_tracer("test"))
    policy = ReadPolicy("max_lag_seconds=30", "off", 30.0)
    with tracing.reader(policy, router._topology) as span:
        span.chosen(one, "replica")
    a = dict(only(exporter).attributes or {})
    assert a["replica_router.max_lag_seconds"] == 30.0
    assert a["replica_router.skipped"] == ("replica-2 (lagging)",)


def test_a_refused_read_fails_its_span_with_the_reason(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    router = ReplicaRouter(URL, REPLICAS)
    tracing = OtelTracing(provider.get_tracer("test"))
    error = NoHealthyReplicaError(
        "no replica is fit to serve reads and fallback to the primary is off"
    )
    with (
        pytest.raises(NoHealthyReplicaError),
        tracing.reader(ReadPolicy("default", "lsn"), router._topology),
    ):
        raise error
    found = only(exporter)
    a = dict(found.attributes or {})
    assert found.status.status_code is StatusCode.ERROR
    assert found.status.description == f"no_healthy_replica: {error}"
    assert a["error.type"] == "replica_router.NoHealthyReplicaError"
    assert a["replica_router.attempts"] == 0


def test_reasons_and_error_types() -> None:
    lost = PrimaryUnavailableError("the primary is unreachable (OSError)")
    lost.__cause__ = ConnectionRefusedError()
    assert reason_of(lost) == "connection"
    assert reason_of(ConsistencyTimeoutError("too slow")) == "consistency_timeout"
    assert reason_of(ValueError()) == "other"
    assert error_type_of(ValueError()) == "ValueError"
    assert error_type_of(lost) == "replica_router.PrimaryUnavailableError"
    assert error_type_of(Custom()) == f"{__name__}.Custom"


class Custom(Exception):
    pass


# -- the local trace backend --------------------------------------------------------------


def test_the_jaeger_compose_file_matches_the_compose_spec() -> None:
    import json
    from importlib.resources import files
    from pathlib import Path

    import jsonschema
    import yaml

    path = Path(__file__).resolve().parents[2] / "deploy" / "compose.otel.yaml"
    compose = yaml.safe_load(path.read_text("utf-8"))
    vendor = files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text("utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert [error.message for error in validator.iter_errors(compose)] == []
    # OTLP in, the UI out, on loopback only.
    ports = compose["services"]["jaeger"]["ports"]
    assert sorted(ports) == [f"127.0.0.1:{p}:{p}" for p in ("16686", "4317", "4318")]


def test_the_readme_snippet_instruments_a_router() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    _, found, rest = readme.partition("<!-- snippet: otel -->\n```python\n")
    assert found
    router = ReplicaRouter(URL)
    exec(compile(rest.split("```", 1)[0], "README.md <otel>", "exec"), {"router": router})
    assert isinstance(router._checkout.trace, OtelTracing)  # the global provider's proxy
    uninstrument(router)
