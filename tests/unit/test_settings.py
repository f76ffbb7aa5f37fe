"""Settings: every bad value is refused at start-up with the variable's name."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import event

from replica_router import ConfigurationError, ReplicaRouter, RouterSettings
from replica_router._router import _read_only_connection

PRIMARY = "postgresql://app:hunter2@db-rw:5432/app"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("REPLICA_ROUTER_") and name not in {
            "REPLICA_ROUTER_PG_BIN",
            "REPLICA_ROUTER_PG_USER",
        }:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_from_env_reads_urls_and_normalises_the_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", "postgres://app:hunter2@db-rw:5432/app")
    monkeypatch.setenv(
        "REPLICA_ROUTER_REPLICA_URLS",
        " postgresql://app:hunter2@ro-1:5432/app , postgresql+asyncpg://app:hunter2@ro-2:5432/app?replica_name=eu&replica_weight=3,",
    )
    router = ReplicaRouter.from_env()
    assert router.primary.url.drivername == "postgresql+asyncpg"
    assert [r.name for r in router.replicas] == ["replica-1", "eu"]
    assert [r.weight for r in router.replicas] == [1.0, 3.0]
    assert "replica_name" not in str(router.replicas[1].url)
    assert "hunter2" not in repr(router)


def test_empty_replica_list_means_no_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", PRIMARY)
    monkeypatch.setenv("REPLICA_ROUTER_REPLICA_URLS", "")
    assert ReplicaRouter.from_env().replicas == ()


def test_a_dotenv_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        f"REPLICA_ROUTER_PRIMARY_URL={PRIMARY}\nREPLICA_ROUTER_POOL_SIZE=3\n"
    )
    router = ReplicaRouter.from_env()
    assert router.settings.pool_size == 3


def test_the_prefix_can_be_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYAPP_PRIMARY_URL", PRIMARY)
    monkeypatch.setenv("MYAPP_STRATEGY", "nope")
    with pytest.raises(ConfigurationError, match="MYAPP_STRATEGY"):
        ReplicaRouter.from_env(env_prefix="MYAPP_")


def test_missing_primary_names_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="REPLICA_ROUTER_PRIMARY_URL is not set"):
        ReplicaRouter.from_env()


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "REPLICA_ROUTER_PRIMARY_URL",
            "mysql://app:hunter2@db:3306/app",
            "unsupported scheme 'mysql'",
        ),
        ("REPLICA_ROUTER_PRIMARY_URL", "not a url with hunter2", "not a database URL"),
        (
            "REPLICA_ROUTER_PRIMARY_URL",
            "postgresql://app:hunter2@db:port/app",
            "not a database URL",
        ),
        ("REPLICA_ROUTER_PRIMARY_URL", "postgresql://app:hunter2@/app", "names no host"),
        (
            "REPLICA_ROUTER_REPLICA_URLS",
            "postgresql://app:hunter2@ro:5432/app?replica_weight=0",
            "replica_weight must be a number greater than 0",
        ),
        ("REPLICA_ROUTER_REPLICA_URLS", "sqlite:///hunter2.db", "unsupported scheme"),
        ("REPLICA_ROUTER_HEALTH_INTERVAL", "0", "greater than 0"),
        ("REPLICA_ROUTER_HEALTH_INTERVAL", "soon", "valid number"),
        ("REPLICA_ROUTER_MAX_LAG_SECONDS", "-1", "greater than or equal to 0"),
        ("REPLICA_ROUTER_FALLBACK_TO_PRIMARY", "maybe", "valid boolean"),
        (
            "REPLICA_ROUTER_STRATEGY",
            "fastest",
            "'round_robin', 'random', 'least_in_flight' or 'weighted'",
        ),
        ("REPLICA_ROUTER_READ_YOUR_WRITES", "always", "'off', 'request' or 'lsn'"),
        ("REPLICA_ROUTER_CONSISTENCY_WAIT", "-0.5", "greater than or equal to 0"),
        ("REPLICA_ROUTER_POOL_SIZE", "0", "greater than or equal to 1"),
        ("REPLICA_ROUTER_CHECKOUT_ATTEMPTS", "many", "valid integer"),
    ],
)
def test_bad_values_name_the_variable_and_hide_passwords(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", PRIMARY)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        ReplicaRouter.from_env()
    message = str(caught.value)
    assert variable in message
    assert expected in message
    assert "hunter2" not in message
    assert isinstance(caught.value, ValueError)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_explicit_constructor_names_the_parameter() -> None:
    with pytest.raises(ConfigurationError, match=r"replica_urls\[1\] has the unsupported scheme"):
        ReplicaRouter(PRIMARY, ["postgresql://a:hunter2@r1/app", "redis://a:hunter2@r2/0"])
    with pytest.raises(ConfigurationError, match="primary_url is not a database URL"):
        ReplicaRouter("hunter2")
    with pytest.raises(ConfigurationError, match="a sequence of URLs"):
        ReplicaRouter(PRIMARY, "postgresql://a:hunter2@r1/app")  # a str is a Sequence[str] to mypy
    with pytest.raises(ConfigurationError, match="unique"):
        ReplicaRouter(
            PRIMARY,
            ["postgresql://a@r1/app?replica_name=x", "postgresql://a@r2/app?replica_name=x"],
        )


def test_explicit_settings_ignore_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICA_ROUTER_POOL_SIZE", "not read")
    settings = RouterSettings.defaults(pool_size=4)
    assert settings.pool_size == 4
    with pytest.raises(ConfigurationError, match=r"^invalid configuration:\n  pool_size: "):
        RouterSettings.defaults(pool_size=0)


def test_options_reach_every_engine_and_sessionmaker() -> None:
    router = ReplicaRouter(
        PRIMARY,
        ["postgresql://app:hunter2@ro-1/app"],
        engine_options={"pool_size": 3, "connect_args": {"command_timeout": 7}},
        session_options={"autoflush": False, "info": {"team": "notes"}},
    )
    for node in router.nodes:
        assert node.engine.pool.size() == 3  # type: ignore[attr-defined]
        assert node.sessionmaker.kw["autoflush"] is False
        assert node.sessionmaker.kw["info"] == {"team": "notes"}
        assert node.sessionmaker.kw["expire_on_commit"] is False
    # Replica connections begin every transaction READ ONLY (set once per connection).
    assert event.contains(router.replicas[0].engine.sync_engine, "connect", _read_only_connection)
    assert not event.contains(router.primary.engine.sync_engine, "connect", _read_only_connection)
    assert "postgresql_readonly" not in router.primary.engine.get_execution_options()
    assert router.primary.reader_sessionmaker.kw["bind"].get_execution_options()[
        "postgresql_readonly"
    ]


def test_settings_repr_masks_secrets() -> None:
    settings = RouterSettings.defaults(primary_url=PRIMARY, replica_urls=PRIMARY)
    shown = repr(settings) + str(settings)
    assert "hunter2" not in shown


def test_a_password_in_the_query_is_masked_too() -> None:
    url = "postgresql://app@db-rw:5432/app?password=hunter2"
    router = ReplicaRouter(url, [url.replace("db-rw", "ro-1")])
    settings = RouterSettings.defaults(primary_url=url, replica_urls=url)
    for shown in (repr(router), repr(router.replicas[0]), repr(settings), str(router.status())):
        assert "hunter2" not in shown
