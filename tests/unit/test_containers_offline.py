"""DockerCluster without Docker: what it would run, its scripts, and its errors.

The containers themselves are exercised in tests/integration/test_containers.py,
which needs a Docker engine; here the entrypoint scripts run under bash with
stand-ins for pg_basebackup and psql.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, NamedTuple

import pytest

from replica_router.testing import ClusterError
from replica_router.testing.containers import (
    DEFAULT_IMAGE,
    DockerCluster,
    docker_engine_error,
    primary_init_script,
    server_command,
)
from replica_router.testing.pytest_plugin import _new_cluster


def env_of(cluster: DockerCluster, node: str) -> dict[str, str]:
    spec = next(spec for spec in cluster.container_specs() if spec.node == node)
    return dict(spec.environment)


def fake_tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\nset -eu\n" + body)
    path.chmod(0o755)


def run_script(script: str, env: dict[str, str], bin_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script, "bash", "echo", "server started"],
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def test_one_primary_and_one_container_per_replica() -> None:
    cluster = DockerCluster(replicas=2, user="app_user", password="s3cret", database="notes")
    specs = cluster.container_specs()
    assert [spec.node for spec in specs] == ["primary", "replica-1", "replica-2"]
    assert {spec.image for spec in specs} == {DEFAULT_IMAGE}
    primary = specs[0]
    assert primary.user is None  # the image's entrypoint starts as root, then drops to postgres
    assert primary.environment["POSTGRES_USER"] == "app_user"
    assert primary.environment["POSTGRES_PASSWORD"] == "s3cret"
    assert primary.environment["POSTGRES_DB"] == "notes"
    for index, spec in enumerate(specs[1:], start=1):
        assert spec.user == "postgres"
        assert spec.environment["REPLICA_ROUTER_PRIMARY_HOST"] == "primary"
        assert spec.environment["REPLICA_ROUTER_SLOT"] == f"replica_{index}"
        assert spec.environment["REPLICA_ROUTER_NODE"] == f"replica-{index}"
        assert "pg_basebackup" in spec.entrypoint[2]
    # Every node gets the same replication settings.
    assert {spec.command for spec in specs} == {primary.command}
    assert "POSTGRES_PASSWORD" not in repr(primary)
    assert "s3cret" not in repr(primary)


def test_server_settings_for_replication() -> None:
    cluster = DockerCluster(replicas=8, server_settings={"log_min_messages": "debug1"})
    command = cluster.container_specs()[0].command
    assert command[0] == "postgres"
    settings = dict(arg.split("=", 1) for arg in command[2::2])
    assert command[1::2] == ("-c",) * len(settings)
    assert settings["wal_level"] == "replica"
    assert settings["hot_standby"] == "on"
    assert settings["listen_addresses"] == "*"
    assert settings["max_wal_senders"] == settings["max_replication_slots"] == "12"
    assert settings["log_min_messages"] == "debug1"
    assert server_command({"a": "b c"}) == ("postgres", "-c", "a=b c")


def test_the_init_script_makes_a_replication_role_its_hba_entry_and_slots(tmp_path: Path) -> None:
    cluster = DockerCluster(replicas=2)
    env = env_of(cluster, "primary")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # psql stand-in: record the options and the SQL it was given.
    fake_tool(bin_dir, "psql", f'echo "$@" > {tmp_path}/psql.args\ncat > {tmp_path}/psql.sql\n')
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    (pgdata / "pg_hba.conf").write_text("host all all all scram-sha-256\n")
    result = run_script(
        primary_init_script(2),
        {**env, "PGDATA": str(pgdata)},
        bin_dir,
    )
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "psql.args").read_text()
    assert "role=replicator" in args
    assert f"password={env['REPLICA_ROUTER_REPLICATION_PASSWORD']}" in args
    sql = (tmp_path / "psql.sql").read_text()
    assert "CREATE ROLE :\"role\" WITH LOGIN REPLICATION PASSWORD :'password';" in sql
    assert "pg_create_physical_replication_slot('replica_1', true)" in sql
    assert "pg_create_physical_replication_slot('replica_2', true)" in sql
    hba = (pgdata / "pg_hba.conf").read_text().splitlines()
    assert hba[-1] == "host replication replicator all scram-sha-256"


def test_the_primary_entrypoint_installs_the_init_script_then_hands_over() -> None:
    entrypoint = DockerCluster(replicas=1).container_specs()[0].entrypoint
    assert entrypoint[:2] == ("bash", "-c")
    script = entrypoint[2]
    assert "cat > /docker-entrypoint-initdb.d/replica-router.sh <<'INIT'\n" in script
    assert primary_init_script(1) + "INIT\n" in script
    assert script.rstrip().endswith('exec docker-entrypoint.sh "$@"')
    check = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_a_replica_makes_itself_with_pg_basebackup_once(tmp_path: Path) -> None:
    cluster = DockerCluster(replicas=2)
    spec = cluster.container_specs()[2]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake_tool(
        bin_dir,
        "pg_basebackup",
        f'printf "%s\\n" "$@" >> {calls}\necho 18 > "$PGDATA/PG_VERSION"\n',
    )
    pgdata = tmp_path / "replica" / "data"
    env = {**spec.environment, "PGDATA": str(pgdata)}
    first = run_script(spec.entrypoint[2], env, bin_dir)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "server started\n"  # then it runs the server command
    assert oct(pgdata.stat().st_mode & 0o777) == oct(0o700)
    args = calls.read_text().splitlines()
    password = spec.environment["REPLICA_ROUTER_REPLICATION_PASSWORD"]
    assert f"--pgdata={pgdata}" in args
    assert "--write-recovery-conf" in args
    assert "--wal-method=stream" in args
    assert "--slot=replica_2" in args
    assert (
        f"--dbname=host=primary port=5432 user=replicator password={password} "
        "application_name=replica-2"
    ) in args
    # A restarted container keeps its data: no second base backup.
    again = run_script(spec.entrypoint[2], env, bin_dir)
    assert again.returncode == 0, again.stderr
    assert calls.read_text().splitlines() == args


def test_passwords_are_random_and_separate() -> None:
    a, b = DockerCluster(replicas=1), DockerCluster(replicas=1)
    assert a.password != b.password
    replication = env_of(a, "replica-1")["REPLICA_ROUTER_REPLICATION_PASSWORD"]
    assert replication != a.password
    assert replication == env_of(a, "primary")["REPLICA_ROUTER_REPLICATION_PASSWORD"]


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: DockerCluster(replicas=-1), "replicas must be an integer >= 0"),
        (lambda: DockerCluster(image=""), "image must be a non-empty string"),
        (lambda: DockerCluster(database=""), "database must be a non-empty string"),
        (lambda: DockerCluster(server_settings={"bad name": "1"}), "not a valid setting name"),
    ],
)
def test_bad_arguments(make: Callable[[], DockerCluster], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        make()


def test_not_started() -> None:
    cluster = DockerCluster(replicas=1)
    assert repr(cluster) == "<DockerCluster not started>"
    with pytest.raises(ClusterError, match="not started"):
        _ = cluster.primary_url


@pytest.mark.parametrize("module", ["docker", "testcontainers.core.container"])
def test_start_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"pip install 'replica-router\[testcontainers\]'"):
        DockerCluster(replicas=1).start()


def test_start_without_an_engine_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    cluster = DockerCluster(replicas=1)
    with pytest.raises(
        ClusterError, match=r"no Docker engine reachable at unix://.*no such socket"
    ):
        cluster.start()
    assert repr(cluster) == "<DockerCluster not started>"


def test_an_engine_that_does_not_answer(tmp_path: Path) -> None:
    # A socket nobody accepts on: docker's own connection fails, and its socket is collected.
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DOCKER_HOST", f"unix://{path}")
            reason = docker_engine_error()
    assert reason is not None
    assert reason.startswith(f"no Docker engine reachable at unix://{path}: ")


def test_the_plugin_picks_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICA_ROUTER_TEST_REPLICAS", "1")
    monkeypatch.setenv("REPLICA_ROUTER_TEST_CLUSTER", "docker")
    monkeypatch.setenv("REPLICA_ROUTER_TEST_IMAGE", "postgres:17-alpine")
    cluster = _new_cluster()
    assert isinstance(cluster, DockerCluster)
    assert cluster.image == "postgres:17-alpine"
    assert cluster.replica_count == 1
    monkeypatch.setenv("REPLICA_ROUTER_TEST_CLUSTER", "kubernetes")
    with pytest.raises(pytest.UsageError, match="'local' or 'docker'"):
        _new_cluster()


# -- the control flow, on stand-ins for testcontainers and docker ------------------------------


class FakeExecResult(NamedTuple):
    exit_code: int
    output: tuple[bytes | None, bytes | None]


class FakeDockerContainer:
    """What DockerCluster uses of the docker SDK's container (``get_wrapped_container()``)."""

    def __init__(self, ready: bool = True) -> None:
        self.status = "created"
        self.ready = ready
        self.kills: list[str | None] = []
        self.execs: list[tuple[list[str], str]] = []

    def reload(self) -> None:
        pass

    def start(self) -> None:
        self.status = "running"

    def kill(self, signal: str | None = None) -> None:
        self.kills.append(signal)
        if signal in (None, "SIGINT", "SIGQUIT", "SIGTERM"):
            self.status = "exited"

    def wait(self, timeout: int | None = None) -> dict[str, int]:
        return {"StatusCode": 0}

    def logs(self, tail: int) -> bytes:
        return b"FATAL: the last words of the server\n"

    def exec_run(
        self, command: list[str], user: str, environment: dict[str, str], demux: bool
    ) -> FakeExecResult:
        self.execs.append((command, user))
        if "pg_isready" in command and not self.ready:
            self.status = "exited"
            return FakeExecResult(2, (None, None))
        return FakeExecResult(0, (b"t\x1f1\n", b""))


class FakeContainer:
    """A stand-in for testcontainers' DockerContainer."""

    made: ClassVar[list[FakeContainer]] = []
    fail_replicas: ClassVar[bool] = False

    def __init__(self, image: str) -> None:
        self.image = image
        self.env: dict[str, str] = {}
        self.options: dict[str, object] = {}
        self.removed = False
        self.wrapped = FakeDockerContainer()
        FakeContainer.made.append(self)

    def with_name(self, name: str) -> FakeContainer:
        self.name = name
        return self

    def with_network(self, network: FakeNetwork) -> FakeContainer:
        self.network = network
        return self

    def with_network_aliases(self, *aliases: str) -> FakeContainer:
        self.aliases = aliases
        if FakeContainer.fail_replicas and aliases[0].startswith("replica"):
            self.wrapped.ready = False
        return self

    def with_bind_ports(self, container: int, host: int) -> FakeContainer:
        self.ports = (container, host)
        return self

    def with_command(self, command: list[str]) -> FakeContainer:
        self.command = command
        return self

    def with_kwargs(self, **kwargs: object) -> FakeContainer:
        self.options = kwargs
        return self

    def with_env(self, key: str, value: str) -> FakeContainer:
        self.env[key] = value
        return self

    def start(self) -> FakeContainer:
        self.wrapped.start()
        return self

    def stop(self) -> None:
        self.removed = True

    def get_wrapped_container(self) -> FakeDockerContainer:
        return self.wrapped

    def get_container_host_ip(self) -> str:
        return "docker-host"


class FakeNetwork:
    made: ClassVar[list[FakeNetwork]] = []

    def __init__(self) -> None:
        self.removed = False
        FakeNetwork.made.append(self)

    def create(self) -> FakeNetwork:
        return self

    def remove(self) -> None:
        self.removed = True


@pytest.fixture
def fake_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    import testcontainers.core.container
    import testcontainers.core.network

    from replica_router.testing import containers

    monkeypatch.setattr(containers, "docker_engine_error", lambda: None)
    monkeypatch.setattr(testcontainers.core.container, "DockerContainer", FakeContainer)
    monkeypatch.setattr(testcontainers.core.network, "Network", FakeNetwork)
    FakeContainer.made, FakeNetwork.made, FakeContainer.fail_replicas = [], [], False


@pytest.mark.usefixtures("fake_docker")
def test_start_runs_a_container_per_node_on_one_network() -> None:
    with DockerCluster(replicas=2) as cluster:
        replica_1 = FakeContainer.made[1]
        assert [c.aliases for c in FakeContainer.made] == [
            ("primary",),
            ("replica-1",),
            ("replica-2",),
        ]
        network = FakeNetwork.made[0]
        assert all(c.network is network for c in FakeContainer.made)
        specs = cluster.container_specs()
        for container, spec, node in zip(FakeContainer.made, specs, cluster.nodes, strict=True):
            assert container.options["entrypoint"] == list(spec.entrypoint)
            assert container.options.get("user") == spec.user
            assert container.command == list(spec.command)
            assert container.env == dict(spec.environment)
            assert container.ports == (5432, node.port)
            assert container.name == f"{cluster._prefix}-{node.name}"
        # Every node was probed over TCP before start() returned.
        for container in FakeContainer.made:
            command, user = container.wrapped.execs[0]
            assert command[2:5] == ["pg_isready", "-q", "-h"]
            assert user == "postgres"
        assert cluster.primary_url.startswith("postgresql+asyncpg://postgres:")
        assert f"@docker-host:{cluster.primary.port}/app" in cluster.primary_url
        assert cluster.execute("replica-1", "SELECT 1") == [("t", "1")]
        command, _ = replica_1.wrapped.execs[-1]
        assert command[:5] == ["timeout", "60", "psql", "-p", "5432"]
        assert command[-2:] == ["-c", "SELECT 1"]
    assert all(c.removed for c in FakeContainer.made)
    assert network.removed
    assert repr(cluster) == "<DockerCluster not started>"


@pytest.mark.usefixtures("fake_docker")
def test_fault_controls_act_on_the_containers() -> None:
    with DockerCluster(replicas=1) as cluster:
        replica = FakeContainer.made[1].wrapped
        cluster.kill_node("replica-1")
        assert replica.kills == [None]  # docker's default: SIGKILL
        assert not cluster.is_running("replica-1")
        with pytest.raises(ClusterError, match="replica-1 is not running"):
            cluster.execute("replica-1", "SELECT 1")
        cluster.start_node("replica-1")
        assert cluster.is_running("replica-1")
        cluster.stop_node("replica-1", "smart")
        assert replica.kills == [None, "SIGTERM"]
        cluster.start_node("replica-1")
        cluster.restart_node("replica-1")
        assert replica.kills == [None, "SIGTERM", "SIGINT"]
        assert cluster.is_running("replica-1")
        cluster.pause_replay("replica-1")
        assert replica.execs[-1][0][-1] == "SELECT pg_wal_replay_pause()"
        with pytest.raises(ClusterError, match="primary is not a replica"):
            cluster.pause_replay("primary")


@pytest.mark.usefixtures("fake_docker")
def test_a_replica_that_does_not_start_is_reported_and_everything_removed() -> None:
    FakeContainer.fail_replicas = True
    cluster = DockerCluster(replicas=1)
    with pytest.raises(ClusterError, match="replica-1 exited while starting") as caught:
        cluster.start()
    assert "the last words of the server" in str(caught.value)
    assert all(c.removed for c in FakeContainer.made)
    assert FakeNetwork.made[0].removed
