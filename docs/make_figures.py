"""Make the README's figures from a real local cluster: a trace, and the status page.

    python docs/make_figures.py            # both
    python docs/make_figures.py trace      # docs/trace.txt only

The trace: a small FastAPI app (FastAPI's own telemetry, SQLAlchemy's instrumentation,
the router's spans) serves a write, a read right after it while the replicas' replay
is paused (the read waits for replay), and a read while replica-2 is killed; the SDK's
in-memory exporter's spans are printed as one tree per request (docs/trace.txt). The
status page: the demo app over the cluster, replay paused on replica-1, screenshot by
headless Chromium (Debian's ``chromium``) into docs/status-page.png.
"""

# No ``from __future__ import annotations``: FastAPI resolves the app's annotations at
# run time, and they name aliases local to notes_app().
import asyncio
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from replica_router import ReadYourWritesMiddleware, ReplicaRouter, RouterSettings
from replica_router.otel import instrument
from replica_router.testing import LocalCluster

DOCS = Path(__file__).resolve().parent


def notes_app(router: ReplicaRouter, provider: TracerProvider) -> FastAPI:
    app = FastAPI(telemetry={"tracer_provider": provider, "metrics": False, "logs": False})
    app.add_middleware(ReadYourWritesMiddleware, router=router)
    Writer = Annotated[AsyncSession, Depends(router.writer)]
    Reader = Annotated[AsyncSession, Depends(router.reader)]

    @app.post("/notes")
    async def create(db: Writer) -> dict[str, int]:
        row = await db.execute(text("INSERT INTO notes (body) VALUES ('hi') RETURNING id"))
        return {"id": row.scalar_one()}

    @app.get("/notes/latest")
    async def latest(db: Reader) -> dict[str, Any]:
        return {"id": (await db.execute(text("SELECT max(id) FROM notes"))).scalar_one()}

    return app


def render(spans: Sequence[ReadableSpan]) -> str:
    """Each request's spans as a tree: name, kind, duration, the router's attributes."""
    children: dict[int | None, list[ReadableSpan]] = {}
    ids = {s.context.span_id for s in spans if s.context is not None}
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        parent = span.parent.span_id if span.parent is not None else None
        children.setdefault(parent if parent in ids else None, []).append(span)
    lines: list[str] = []

    def walk(span: ReadableSpan, prefix: str, last: bool, root: bool) -> None:
        took = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        branch = "" if root else ("└─ " if last else "├─ ")
        label = f"{prefix}{branch}{span.name}"
        lines.append(f"{label:<44} {span.kind.name:<8} {took:7.2f} ms")
        inner = prefix + ("" if root else ("   " if last else "│  "))
        if span.name.startswith("replica_router."):
            pad = inner + ("   " if not children.get(span.context.span_id) else "│  ")
            for key, value in sorted((span.attributes or {}).items()):
                shown = list(value) if isinstance(value, tuple) else value
                if isinstance(shown, float):
                    shown = round(shown, 4)
                lines.append(f"{pad}  {key} = {shown!r}")
            if span.status.status_code.name == "ERROR":
                lines.append(f"{pad}  status = ERROR: {span.status.description}")
            for event in span.events:
                lines.append(f"{pad}  event {event.name} {dict(event.attributes or {})}")
        kids = children.get(span.context.span_id, [])
        for i, child in enumerate(kids):
            walk(child, inner, i == len(kids) - 1, False)

    for root in children.get(None, []):
        walk(root, "", True, True)
        lines.append("")
    return "\n".join(lines)


async def trace_requests(cluster: LocalCluster) -> str:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = RouterSettings.defaults(health_interval=0.25, consistency_wait=2.0)
    router = ReplicaRouter(cluster.primary_url, cluster.replica_urls, settings=settings)
    instrument(router, tracer_provider=provider, metrics=False)
    engines = [node.engine.sync_engine for node in router.nodes]
    sqlalchemy = SQLAlchemyInstrumentor()
    # Its declared range stops below SQLAlchemy 2.1, which it traces all the same.
    sqlalchemy.instrument(engines=engines, tracer_provider=provider, skip_dep_check=True)
    app = notes_app(router, provider)
    transport = httpx.ASGITransport(app=app)
    out: list[str] = []
    try:
        async with router, httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            for _ in range(4):  # warm: every node's pool has a connection
                await c.post("/notes")
                await c.get("/notes/latest")
            await asyncio.sleep(0.6)
            for replica in cluster.replicas:
                cluster.pause_replay(replica.name)
            exporter.clear()
            (await c.post("/notes")).raise_for_status()

            def resume() -> None:
                for replica in cluster.replicas:
                    cluster.resume_replay(replica.name)

            timer = threading.Timer(0.3, resume)
            timer.start()
            (await c.get("/notes/latest")).raise_for_status()
            timer.join()
            out.append(render(exporter.get_finished_spans()))
            await asyncio.sleep(0.6)  # both replicas caught up, probed
            c.cookies.clear()
            cluster.kill_node("replica-2")
            exporter.clear()
            for _ in range(2):  # round robin: one of the two tries replica-2 first
                (await c.get("/notes/latest")).raise_for_status()
            spans = exporter.get_finished_spans()
            failed = [
                s
                for s in spans
                if s.name == "replica_router.reader"
                and any(e.name == "replica_router.attempt_failed" for e in s.events)
            ]
            trace_id = failed[0].context.trace_id
            out.append(render([s for s in spans if s.context.trace_id == trace_id]))
    finally:
        sqlalchemy.uninstrument()
        provider.shutdown()
    return "\n".join(out)


def screenshot(cluster: LocalCluster, path: Path) -> None:
    import uvicorn

    from replica_router._demo.app import build_app

    browser = shutil.which("chromium")
    if browser is None:
        raise SystemExit("no chromium: apt-get install -y chromium")
    settings = RouterSettings.defaults(health_interval=0.25, max_lag_seconds=1.0)
    router = ReplicaRouter(cluster.primary_url, cluster.replica_urls, settings=settings)
    config = uvicorn.Config(build_app(router), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise SystemExit("the app did not start")
            await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base) as client:
            cluster.pause_replay("replica-1")
            for _ in range(120):  # traffic: writes, reads after them, plain reads
                await client.post("/notes", json={"body": "hello"})
                await client.get("/notes/latest")
                await asyncio.sleep(0.02)
            with tempfile.TemporaryDirectory() as profile:
                command = [
                    browser,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={profile}",
                    "--virtual-time-budget=3000",
                    "--window-size=1200,520",
                    f"--screenshot={path}",
                    f"{base}/health/ui",
                ]
                await asyncio.to_thread(subprocess.run, command, check=True, capture_output=True)
            cluster.resume_replay("replica-1")
        server.should_exit = True
        await task

    asyncio.run(main())


def main(argv: list[str]) -> int:
    what = set(argv) or {"trace", "page"}
    with LocalCluster(replicas=2) as cluster:
        cluster.execute(
            "primary",
            "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL); "
            "CREATE TABLE demo_notes (id bigserial PRIMARY KEY, body text NOT NULL, "
            "created_at timestamptz NOT NULL DEFAULT now())",
        )
        cluster.wait_for_replay()
        if "page" in what:
            screenshot(cluster, DOCS / "status-page.png")
        if "trace" in what:
            rendered = asyncio.run(trace_requests(cluster))
            (DOCS / "trace.txt").write_text(rendered)
            print(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
