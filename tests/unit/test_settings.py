"""Settings: every bad value is refused at start-up with the variable's name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.engine import make_url

from replica_router import ConfigurationError, ReplicaRouter, RouterSettings
from replica_router._drivers import AsyncpgDriver
from replica_router._nodes import read_only_hook
from replica_router._settings import HARNESS_VARIABLES

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
    _read_only_connection = read_only_hook(AsyncpgDriver())
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


# -- unknown variables and keywords ------------------------------------------------------


def configuration_error(env_prefix: str = "REPLICA_ROUTER_", env_file: str | None = ".env") -> str:
    """The message of the error ``from_env`` raises; it never shows a password."""
    with pytest.raises(ConfigurationError) as caught:
        ReplicaRouter.from_env(env_prefix=env_prefix, env_file=env_file)
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert "hunter2" not in message
    return message


def test_a_misspelled_variable_in_the_environment_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", PRIMARY)
    monkeypatch.setenv("REPLICA_ROUTER_REPLICA_URL", "postgresql://app:hunter2@ro-1:5432/app")
    message = configuration_error()
    assert message == (
        "invalid configuration:\n  REPLICA_ROUTER_REPLICA_URL is not a setting; did you mean "
        "REPLICA_ROUTER_REPLICA_URLS? (in the environment)"
    )


def test_names_are_matched_without_regard_to_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", PRIMARY)
    monkeypatch.setenv("replica_router_pool_size", "3")  # read by pydantic-settings: known
    assert ReplicaRouter.from_env().settings.pool_size == 3
    monkeypatch.setenv("Replica_Router_Pool_Sise", "3")
    expected = "Replica_Router_Pool_Sise is not a setting; did you mean REPLICA_ROUTER_POOL_SIZE?"
    assert expected in configuration_error()


def test_a_misspelled_variable_in_a_dotenv_file_is_an_error(tmp_path: Path) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text(
        f"REPLICA_ROUTER_PRIMARY_URL={PRIMARY}\n"
        "REPLICA_ROUTER_MAX_LAG_SECOND=1\n"
        # Variables without the prefix belong to the application: still ignored.
        "DATABASE_URL=postgresql://app:hunter2@db:5432/app\nSECRET_KEY=hunter2\n"
    )
    with pytest.raises(ConfigurationError) as caught:
        RouterSettings(_env_file=env_file)
    assert str(caught.value) == (
        "invalid configuration:\n  REPLICA_ROUTER_MAX_LAG_SECOND is not a setting; did you mean "
        f"REPLICA_ROUTER_MAX_LAG_SECONDS? (in {env_file})"
    )
    env_file.write_text(f"REPLICA_ROUTER_PRIMARY_URL={PRIMARY}\nDATABASE_URL=x\nOTHER=1\n")
    assert RouterSettings(_env_file=env_file).primary_url is not None


def test_the_default_dotenv_file_is_checked_too(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        f"REPLICA_ROUTER_PRIMARY_URL={PRIMARY}\nREPLICA_ROUTER_POOLSIZE=3\n"
    )
    expected = "REPLICA_ROUTER_POOLSIZE is not a setting; did you mean REPLICA_ROUTER_POOL_SIZE?"
    assert f"{expected} (in .env)" in configuration_error()
    # from_env(env_file=None) reads no file, so it finds nothing wrong in one.
    (tmp_path / ".env").write_text("REPLICA_ROUTER_POOLSIZE=3\n")
    assert "is not set" in configuration_error(env_file=None)


def test_every_unknown_variable_is_listed_in_one_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", PRIMARY)
    monkeypatch.setenv("REPLICA_ROUTER_REPLICA_URL", "postgresql://app:hunter2@ro-1:5432/app")
    monkeypatch.setenv("REPLICA_ROUTER_BANANA", "yellow")
    (tmp_path / ".env").write_text(
        "REPLICA_ROUTER_REPLICA_URL=postgresql://app:hunter2@ro-2:5432/app\n"
        "REPLICA_ROUTER_STRATEGI=random\n"
    )
    lines = configuration_error().splitlines()
    assert lines == [
        "invalid configuration:",
        "  REPLICA_ROUTER_BANANA is not a setting; the Configuration table of the README "
        "lists every setting (in the environment)",
        "  REPLICA_ROUTER_REPLICA_URL is not a setting; did you mean REPLICA_ROUTER_REPLICA_URLS? "
        "(in the environment and .env)",
        "  REPLICA_ROUTER_STRATEGI is not a setting; did you mean REPLICA_ROUTER_STRATEGY? "
        "(in .env)",
    ]


def test_unknown_variables_are_checked_under_the_prefix_in_force(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MYAPP_PRIMARY_URL", PRIMARY)
    monkeypatch.setenv("MYAPP_REPLICA_URL", "postgresql://app:hunter2@ro-1:5432/app")
    # Not under this prefix: neither read nor checked.
    monkeypatch.setenv("REPLICA_ROUTER_REPLICA_URL", "postgresql://app:hunter2@ro-1:5432/app")
    message = configuration_error(env_prefix="MYAPP_")
    assert message == (
        "invalid configuration:\n  MYAPP_REPLICA_URL is not a setting; did you mean "
        "MYAPP_REPLICA_URLS? (in the environment)"
    )
    monkeypatch.delenv("MYAPP_REPLICA_URL")
    assert ReplicaRouter.from_env(env_prefix="MYAPP_").replicas == ()
    with pytest.raises(ConfigurationError, match="REPLICA_ROUTER_REPLICA_URL is not a setting"):
        ReplicaRouter.from_env()


def test_without_a_prefix_no_variable_is_called_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every variable of the process (PATH, HOME, ...) would be "under" an empty prefix.
    monkeypatch.setenv("SOME_TOOL_SETTING", "1")
    assert RouterSettings(_env_prefix="", _env_file=None).pool_size == 10


def test_the_harness_variables_are_allowed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert set(HARNESS_VARIABLES) >= {
        "REPLICA_ROUTER_PG_BIN",
        "REPLICA_ROUTER_PG_USER",
        "REPLICA_ROUTER_TEST_REPLICAS",
        "REPLICA_ROUTER_TEST_CLUSTER",
        "REPLICA_ROUTER_TEST_IMAGE",
        "REPLICA_ROUTER_PGBOUNCER",
        "REPLICA_ROUTER_ETCD_BIN",
    }
    assert not {name.removeprefix("REPLICA_ROUTER_").lower() for name in HARNESS_VARIABLES} & set(
        RouterSettings.model_fields
    )
    monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", PRIMARY)
    for name in HARNESS_VARIABLES:
        monkeypatch.setenv(name, "/opt/somewhere")
    (tmp_path / ".env").write_text("".join(f"{name}=x\n" for name in HARNESS_VARIABLES))
    assert ReplicaRouter.from_env().replicas == ()
    # They are names of their own, not a second prefix: a near miss is still an error.
    monkeypatch.setenv("REPLICA_ROUTER_PG_BINS", "/opt/somewhere")
    assert "did you mean REPLICA_ROUTER_PG_BIN?" in configuration_error()


def test_defaults_ignore_variables_but_not_unknown_keywords(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REPLICA_ROUTER_REPLICA_URL", "not read")
    assert RouterSettings.defaults(max_lag_seconds=1).max_lag_seconds == 1
    with pytest.raises(TypeError) as caught:
        RouterSettings.defaults(max_lag_second=1)
    assert str(caught.value) == (
        "RouterSettings.defaults() got an unexpected keyword argument 'max_lag_second'; "
        "did you mean 'max_lag_seconds'?"
    )
    with pytest.raises(TypeError) as caught:
        RouterSettings(pool_sise=3)
    assert str(caught.value) == (
        "RouterSettings() got an unexpected keyword argument 'pool_sise'; did you mean 'pool_size'?"
    )
    with pytest.raises(TypeError) as caught:
        RouterSettings.defaults(max_lag_second=1, banana=2)
    assert str(caught.value) == (
        "RouterSettings.defaults() got unexpected keyword arguments 'max_lag_second' (did you "
        "mean 'max_lag_seconds'?), 'banana'; the Configuration table of the README lists "
        "every setting"
    )


# -- hosts and ports -----------------------------------------------------------------------

BAD_HOSTS = [
    (
        "postgresql+asyncpg://u:hunter2@h:99999/db",
        "has the port 99999, out of range; expected a number from 1 to 65535",
    ),
    ("postgresql+asyncpg://u:hunter2@h:0/db", "has the port 0, out of range"),
    ("postgresql+asyncpg://u:hunter2@:5432/db", "names no host"),
    (
        "postgresql+asyncpg://u:hunter2@h/db?port=70000",
        "has a ?port= value that is 70000, out of range",
    ),
    (
        "postgresql+asyncpg://u:hunter2@/db?host=h1:5432&host=h2",
        "has a ?host= entry 2 ('h2') without a port; with several hosts each needs one, like "
        "?host=h1:5432&host=h2:5432",
    ),
    (
        "postgresql+asyncpg://u:hunter2@/db?host=h1:5432&host=h2:99999",
        "has a ?host= entry 2 ('h2') whose port is 99999, out of range; expected a number from 1 "
        "to 65535",
    ),
    (
        "postgresql+asyncpg://u:hunter2@/db?host=h1:5432&host=h2:pg",
        "has a ?host= entry 2 ('h2') whose port is not a number",
    ),
    ("postgresql+asyncpg://u:hunter2@/db?host=h1:5432&host=:5432", "has an empty ?host= entry 2"),
    (
        "postgresql+asyncpg://u:hunter2@/db?host=h1:99999",
        "has a ?host= entry ('h1') whose port is 99999",
    ),
    ("postgresql+asyncpg://u:hunter2@/db?host=h1:", "has a ?host= entry ('h1') without a port"),
    (
        "postgresql+asyncpg://u:hunter2@/db?host=h1,&port=5432",
        "has an empty host in its ?host= list",
    ),
    # A password pasted into a host entry is not repeated.
    (
        "postgresql+asyncpg://u:hunter2@/db?host=h1:5432&host=hunter2",
        "has a ?host= entry 2 without a port",
    ),
    (
        "postgresql+asyncpg://u:hunter2@/db?host=h1:5432&host=u:hunter2@h2:5432",
        "has a ?host= entry 2 ('u') that is not host:port",
    ),
]
needs_blank_values = pytest.mark.skipif(
    "keep_blank_values" not in inspect.signature(make_url).parameters,
    reason="SQLAlchemy < 2.1.6 drops blank query values before anyone can see them",
)
BLANK_HOSTS = [
    ("postgresql+asyncpg://u:hunter2@/db?host=h1:5432&host=", "has an empty ?host= entry 2"),
    ("postgresql+asyncpg://u:hunter2@/db?host=", "has an empty ?host= entry;"),
]


@pytest.mark.parametrize(
    ("url", "expected"),
    [*BAD_HOSTS, *(pytest.param(*case, marks=needs_blank_values) for case in BLANK_HOSTS)],
)
def test_bad_hosts_and_ports_name_the_variable_and_hide_passwords(
    monkeypatch: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: ReplicaRouter(url), "primary_url "),
        (lambda: ReplicaRouter(PRIMARY, [url]), "replica_urls[0] "),
        (lambda: RouterSettings.defaults(primary_url=url), "primary_url: the URL "),
        (lambda: RouterSettings.defaults(replica_urls=[url]), "replica_urls: replica 1 "),
    ]
    for call, what in calls:
        with pytest.raises(ConfigurationError) as caught:
            call()
        message = str(caught.value)
        assert f"{what}{expected}" in message
        assert "hunter2" not in message
        assert caught.value.__cause__ is None
    if "," not in url:  # a comma separates replicas in REPLICA_ROUTER_REPLICA_URLS
        monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", PRIMARY)
        replicas = f"postgresql://app:hunter2@ro-1/app,{url}"
        monkeypatch.setenv("REPLICA_ROUTER_REPLICA_URLS", replicas)
        message = configuration_error()
        assert f"REPLICA_ROUTER_REPLICA_URLS: replica 2 {expected}" in message
    monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", url)
    monkeypatch.delenv("REPLICA_ROUTER_REPLICA_URLS", raising=False)
    assert f"REPLICA_ROUTER_PRIMARY_URL: the URL {expected}" in configuration_error()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:hunter2@h:1/db",
        "postgresql://u:hunter2@h:65535/db",
        "postgresql://u:hunter2@[::1]:5432/db",
        "postgresql://u:hunter2@h/db?port=5433",
        "postgresql://u:hunter2@/db?host=h1:5432&host=h2:5433&target_session_attrs=read-write",
        "postgresql://u:hunter2@/db?host=h1",
        "postgresql://u:hunter2@/db?host=h1:5432",
        "postgresql://u:hunter2@/db?host=/var/run/postgresql",
        "postgresql://u:hunter2@/db?host=h1,h2&port=5432,5433",
    ],
)
def test_good_hosts_and_ports_pass(url: str) -> None:
    router = ReplicaRouter(url, [url])
    assert router.primary.url.drivername == "postgresql+asyncpg"
    settings = RouterSettings.defaults(primary_url=url, replica_urls=[url])
    assert settings.primary_url is not None
    assert len(settings.replica_urls) == 1
