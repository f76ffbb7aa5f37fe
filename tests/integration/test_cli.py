"""The ``replica-router`` command line against real servers: ``check`` and ``demo``."""

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from replica_router._discovery import Member, fetch_patroni_members
from replica_router.cli import main
from replica_router.testing import LocalCluster, PatroniCluster
from replica_router.testing.pytest_plugin import heal

pytestmark = pytest.mark.integration


def run_cli(*argv: str) -> int:
    """``main(argv)`` in a thread of its own: its ``asyncio.run`` must not touch the
    event loop that pytest-asyncio keeps for this thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(main, list(argv)).result(timeout=60)


@pytest.fixture
def configured(
    replica_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> LocalCluster:
    """The cluster's URLs in the REPLICA_ROUTER_* variables, and no stray .env file."""
    for name in list(os.environ):
        if name.startswith("REPLICA_ROUTER_") and name not in (
            "REPLICA_ROUTER_PG_BIN",
            "REPLICA_ROUTER_PG_USER",
        ):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", replica_cluster.primary_url)
    monkeypatch.setenv("REPLICA_ROUTER_REPLICA_URLS", ",".join(replica_cluster.replica_urls))
    return replica_cluster


def test_check_healthy_cluster(
    configured: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("check") == 0
    out, err = capsys.readouterr()
    assert configured.password not in out + err
    lines = out.splitlines()
    assert lines[0].split() == ["node", "url", "reachable", "in", "recovery", "lag", "version"]
    for node in configured.nodes:
        row = next(line for line in lines if line.startswith(node.name + " "))
        assert f"postgres:***@127.0.0.1:{node.port}/app" in row
        recovery = "yes (replica)" if node.role == "replica" else "no (primary)"
        assert recovery in row
        assert re.search(r"\byes\b", row)  # reachable
    assert lines[-1].startswith("ok: 3 nodes reachable")


def test_check_json(configured: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("check", "--json") == 0
    out, _ = capsys.readouterr()
    assert configured.password not in out
    report = json.loads(out)
    assert report["ok"] is True
    nodes = {node["name"]: node for node in report["nodes"]}
    assert list(nodes) == [node.name for node in configured.nodes]
    assert nodes["primary"]["in_recovery"] is False
    assert nodes["primary"]["lag_bytes"] is None
    for name in ("replica-1", "replica-2"):
        node = nodes[name]
        assert node["reachable"] is True
        assert node["role"] == node["server_role"] == "replica"
        assert isinstance(node["lag_bytes"], int) and node["lag_bytes"] >= 0
        assert node["server_version"].split(".")[0].isdigit()
        assert node["problems"] == []
        assert "***" in node["url"]


def test_check_reports_lag_of_a_paused_replica(
    configured: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    configured.pause_replay("replica-1")
    try:
        configured.execute("primary", "CREATE TABLE IF NOT EXISTS cli_lag (x int)")
        configured.execute("primary", "INSERT INTO cli_lag SELECT generate_series(1, 1000)")
        # Paused, but reachable and in its role: the exit status is still 0.
        assert run_cli("check", "--json") == 0
    finally:
        configured.resume_replay("replica-1")
    report = json.loads(capsys.readouterr().out)
    replica = report["nodes"][1]
    assert replica["replay_paused"] is True
    assert replica["lag_bytes"] > 0
    # Seconds since its last replayed transaction: unknown (None) if it replayed none yet.
    assert replica["lag_seconds"] is None or replica["lag_seconds"] >= 0
    assert "replica-1: WAL replay is paused" in report["notes"]


def test_check_stopped_replica(
    configured: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    configured.stop_node("replica-2")
    try:
        started = time.monotonic()
        assert run_cli("check", "--timeout", "2") == 1
        assert time.monotonic() - started < 10
        out, _ = capsys.readouterr()
        assert run_cli("check", "--json", "--timeout", "2") == 1
        report = json.loads(capsys.readouterr().out)
    finally:
        heal(configured)
    row = next(line for line in out.splitlines() if line.startswith("replica-2 "))
    assert re.search(r"\bno\b", row)
    assert "problem: replica-2: unreachable" in out
    assert out.splitlines()[-1] == "failed: 1 of 3 nodes have problems"
    assert configured.password not in out
    by_name = {node["name"]: node for node in report["nodes"]}
    assert report["ok"] is False
    assert by_name["replica-2"]["reachable"] is False
    assert by_name["replica-2"]["error"]
    assert by_name["replica-1"]["reachable"] is True
    assert by_name["replica-1"]["problems"] == []


def test_check_wrong_role(
    configured: LocalCluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The primary configured as a replica: reachable, but not in recovery.
    monkeypatch.setenv(
        "REPLICA_ROUTER_REPLICA_URLS", configured.primary_url + "?replica_name=not-a-replica"
    )
    assert run_cli("check") == 1
    out = capsys.readouterr().out
    assert "problem: not-a-replica: configured as a replica but not in recovery" in out


def test_check_custom_prefix(
    configured: LocalCluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REPLICA_ROUTER_PRIMARY_URL")
    monkeypatch.delenv("REPLICA_ROUTER_REPLICA_URLS")
    monkeypatch.setenv("NOTES_DB_PRIMARY_URL", configured.primary_url)
    monkeypatch.setenv("NOTES_DB_REPLICA_URLS", ",".join(configured.replica_urls))
    assert run_cli("check", "--env-prefix", "NOTES_DB_") == 0
    assert "ok: 3 nodes reachable" in capsys.readouterr().out


def test_check_without_replicas_says_so(
    configured: LocalCluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The singular typo is refused as an unknown variable (tests/unit/test_settings.py);
    # a forgotten line leaves the replicas unset: every read would go to the primary.
    monkeypatch.delenv("REPLICA_ROUTER_REPLICA_URLS")
    assert run_cli("check") == 1
    lines = capsys.readouterr().out.splitlines()
    assert (
        "problem: no replicas: REPLICA_ROUTER_REPLICA_URLS is not set, so every read would go "
        "to the primary; set it to the replicas' URLs (comma-separated), or set it empty to "
        "run without replicas"
    ) in lines
    assert lines[-1] == "failed: no replicas configured (1 nodes reachable)"
    assert run_cli("check", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["problems"][0].startswith("no replicas: REPLICA_ROUTER_REPLICA_URLS is not set")

    # Set, and empty: what the user asked for.
    monkeypatch.setenv("REPLICA_ROUTER_REPLICA_URLS", "")
    assert run_cli("check") == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        "note: no replicas (REPLICA_ROUTER_REPLICA_URLS is empty): every read goes to the primary"
        in lines
    )
    assert lines[-1] == (
        "ok: 1 nodes reachable and in their configured roles; no replicas, so every read "
        "goes to the primary"
    )


def patroni_members(cluster: PatroniCluster) -> list[Member]:
    """The members Patroni's REST API lists (in a thread, as ``run_cli``)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, fetch_patroni_members(cluster.patroni_urls, 5.0)).result()


def test_check_follows_patroni(
    patroni_cluster: PatroniCluster,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # With PATRONI_URL the replicas are Patroni's streaming members, as the router finds
    # them; REPLICA_URLS unset is no problem then.
    cluster = patroni_cluster
    for member in cluster.members:  # an earlier test may have crashed or killed some
        if not cluster.is_running(member.name):
            cluster.start_node(member.name, wait=False)
    leader = cluster.wait_healthy(180.0)
    # Patroni's own view (its REST API, what check reads) catches up a loop later.
    deadline = time.monotonic() + 60
    while len([m for m in patroni_members(cluster) if m.readable]) < 2:
        assert time.monotonic() < deadline, "Patroni never listed two streaming replicas"
        time.sleep(0.5)
    for name in list(os.environ):
        if name.startswith("REPLICA_ROUTER_") and name != "REPLICA_ROUTER_PG_BIN":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", cluster.primary_url)
    monkeypatch.setenv("REPLICA_ROUTER_PATRONI_URL", ",".join(cluster.patroni_urls))
    assert run_cli("check") == 0
    out = capsys.readouterr().out
    replicas = {m.name for m in cluster.members} - {leader}
    rows = {line.split()[0] for line in out.splitlines()[1:] if line.split()}
    assert replicas <= rows, out
    assert f"Patroni lists 3 members: leader {leader}, 2 streaming replica(s)" in out


def test_check_says_when_no_patroni_api_answers(
    configured: LocalCluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REPLICA_ROUTER_REPLICA_URLS")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("REPLICA_ROUTER_PATRONI_URL", f"http://127.0.0.1:{port}")
    assert run_cli("check") == 1
    out = capsys.readouterr().out
    assert "REPLICA_ROUTER_PATRONI_URL: no Patroni REST API answered" in out, out


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("REPLICA_ROUTER_HEALTH_INTERVAL", "-1", "greater than 0"),
        ("REPLICA_ROUTER_REPLICA_URLS", "mysql://app:{password}@db-ro:3306/app", "scheme"),
        ("REPLICA_ROUTER_PRIMARY_URL", "", "PRIMARY_URL"),
        ("REPLICA_ROUTER_STRATEGY", "fastest", "round_robin"),
        ("REPLICA_ROUTER_REPLICA_URL", "{url}", "did you mean REPLICA_ROUTER_REPLICA_URLS?"),
    ],
)
def test_check_bad_settings(
    configured: LocalCluster,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    words: str,
) -> None:
    if value:
        url = configured.replica_urls[0]
        monkeypatch.setenv(variable, value.format(password=configured.password, url=url))
    else:
        monkeypatch.delenv(variable)
    assert run_cli("check") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert variable in err
    assert words in err
    assert configured.password not in err


def _leftovers(base_dir: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if base_dir in line]


def test_demo_runs_end_to_end() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "replica_router.cli", "demo", "--duration", "20"],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert elapsed < 90, f"the demo took {elapsed:.0f} s"
    assert "result: OK" in result.stdout
    for phase in ("baseline", "replay paused on replica-1", "replica-2 killed (SIGKILL)"):
        assert phase in result.stdout
    assert "PROBLEM" not in result.stdout
    # The demo's own settings are said, with the defaults they stand in for.
    assert "settings (demo; defaults in brackets): probes every 0.25 s [1], lag bound 1 s [5]" in (
        result.stdout
    )
    # Every decision on screen is explained (replica_after_check, primary_behind, ...).
    decided = re.search(r"reads by decision \(read-your-writes: lsn\): (.*)", result.stdout)
    assert decided is not None
    for name in re.findall(r"([a-z_]+) \d+", decided.group(1)):
        assert f"    {name}: " in result.stdout, name
    match = re.search(r"cluster up in [\d.]+ s in (\S+)", result.stdout)
    assert match is not None, result.stdout[:2000]
    base_dir = match.group(1)
    assert _leftovers(base_dir) == []
    assert not Path(base_dir).exists()
