"""Settings, read from ``REPLICA_ROUTER_*`` environment variables by pydantic-settings.

Every field's description is the "what is expected" half of its error message and
the README's configuration table, so the three never drift apart. A variable under the
prefix that is no setting (a typo such as ``REPLICA_ROUTER_REPLICA_URL``) is an error
too, in the environment and in ``.env``; ``HARNESS_VARIABLES`` are the exceptions.

Example::

    # REPLICA_ROUTER_PRIMARY_URL=postgresql+asyncpg://app:secret@db-rw:5432/app
    # REPLICA_ROUTER_REPLICA_URLS=postgresql://app:secret@db-ro-1:5432/app,postgresql://app:secret@db-ro-2:5432/app?replica_weight=2
    settings = RouterSettings()
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from sqlalchemy.engine import URL

from ._exceptions import ConfigurationError
from ._urls import mask_url, parse_url, split_replica_options

__all__ = [
    "ENV_PREFIX",
    "HARNESS_VARIABLES",
    "RouterSettings",
]

ENV_PREFIX = "REPLICA_ROUTER_"
# REPLICA_ROUTER_* variables that are not router settings: the test harness and the
# command line read them (each by this exact name, whatever the settings' prefix). They
# share the environment and .env files with the settings, so they are not "unknown".
HARNESS_VARIABLES: tuple[str, ...] = (
    "REPLICA_ROUTER_PG_BIN",  # testing: directory of the PostgreSQL server binaries
    "REPLICA_ROUTER_PG_USER",  # testing: the unprivileged server user when run as root
    "REPLICA_ROUTER_TEST_REPLICAS",  # pytest plugin: replicas in the session cluster
    "REPLICA_ROUTER_TEST_CLUSTER",  # pytest plugin: local or docker
    "REPLICA_ROUTER_TEST_IMAGE",  # pytest plugin: the image of the Docker cluster
    "REPLICA_ROUTER_TEST_DRIVER",  # pytest plugin: asyncpg or psycopg in the cluster's URLs
    "REPLICA_ROUTER_PGBOUNCER",  # testing: the PgBouncer binary (transaction pooling)
    "REPLICA_ROUTER_ETCD_BIN",  # testing: the etcd binary (Patroni clusters)
)
_README_TABLE = "the Configuration table of the README lists every setting"
# An HTTP token (RFC 9110): what a cookie or header name may contain.
_TOKEN_NAME = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"


def _split_urls(value: Any) -> Any:
    if isinstance(value, str):
        return [part for part in (p.strip() for p in value.split(",")) if part]
    return value


def _patroni_urls(value: Any) -> Any:
    """Comma-separated http:// addresses of Patroni's REST API."""
    value = _split_urls(value)
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, str) or not item.startswith("http://") or "@" in item:
                raise ValueError("expected http://host:port addresses of Patroni's REST API")
    return value


def _blank_is_none(value: Any) -> Any:
    """An empty (or blank) value of an optional setting means "not set": its None."""
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _secret(value: Any) -> Any:
    """Empty means no secret; otherwise it must be long enough to sign with."""
    if isinstance(value, str) and not value.strip():
        return None
    if isinstance(value, str) and len(value) < 16:
        raise ValueError("must be at least 16 characters (random text, the same on every worker)")
    return value


def _url(value: Any) -> Any:
    if value is None or isinstance(value, URL):
        return value
    if isinstance(value, str):
        return parse_url(value, what="the URL")
    raise ValueError("expected a URL string")


# No environment variable name can contain NUL, so this prefix reads none.
_NO_ENV = "\x00"
# Fields whose input is a secret: their errors never show the input.
_SECRET_FIELDS = frozenset({"primary_url", "replica_urls", "lsn_secret"})


class RouterSettings(BaseSettings):
    """Every setting of a router, read from the environment and ``.env``.

    ``RouterSettings()`` reads ``REPLICA_ROUTER_*`` variables (``_env_prefix=`` changes
    the prefix). Errors are :class:`ConfigurationError` naming the variable, also for a
    variable under the prefix that is no setting; a keyword that is no setting is a
    ``TypeError``.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        hide_input_in_errors=True,
        arbitrary_types_allowed=True,
        validate_default=False,
        frozen=True,
    )

    primary_url: Annotated[URL | None, BeforeValidator(_url)] = Field(
        default=None,
        description=(
            "the primary: postgresql+asyncpg://user:password@host:port/database "
            "(postgres:// and postgresql:// mean asyncpg; postgresql+psycopg:// is "
            "psycopg 3; several hosts as "
            "?host=h1:5432&host=h2:5432&target_session_attrs=read-write)"
        ),
    )
    replica_urls: Annotated[list[URL], NoDecode] = Field(
        default_factory=list,
        description=(
            "replicas, comma-separated URLs, empty for none; options per replica as "
            "query parameters replica_name=... and replica_weight=..."
        ),
    )
    patroni_url: Annotated[list[str], NoDecode, BeforeValidator(_patroni_urls)] = Field(
        default_factory=list,
        description=(
            "Patroni REST API addresses, comma-separated (http://host:8008): the replicas "
            "are the streaming members, followed every health_interval; empty: off"
        ),
    )
    dns_discovery: bool = Field(
        default=False,
        description=(
            "true/false: a replica URL whose host is a DNS name (a Kubernetes headless "
            "Service) becomes one node per address the name resolves to, resolved again "
            "every health_interval"
        ),
    )
    health_interval: float = Field(
        default=1.0, gt=0, description="seconds between health probes of each node, > 0"
    )
    health_timeout: float = Field(
        default=2.0, gt=0, description="seconds a health probe may take before it fails, > 0"
    )
    readmit_after: int = Field(
        default=2, ge=1, description="good probes in a row before a down replica serves again"
    )
    max_lag_seconds: float = Field(
        default=5.0,
        ge=0,
        description="a replica further behind than this many seconds serves no reads",
    )
    max_lag_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=0,
        description="a replica further behind than this many bytes of WAL serves no reads",
    )
    fallback_to_primary: bool = Field(
        default=True, description="true/false: may reads use the primary when no replica is fit"
    )
    fallback_max_in_flight: Annotated[int | None, BeforeValidator(_blank_is_none)] = Field(
        default=None,
        ge=0,
        description=(
            "most reader sessions on the primary at once during a fallback; the excess gets "
            "a 503 (empty: half the primary's pool, pool_size + max_overflow)"
        ),
    )
    strategy: Literal["round_robin", "random", "least_in_flight", "weighted"] = Field(
        default="round_robin",
        description="how reads are spread: round_robin, random, least_in_flight or weighted",
    )
    read_your_writes: Literal["off", "request", "lsn"] = Field(
        default="lsn",
        description=(
            "off, request (after a write, the rest of that request reads from the primary) "
            "or lsn (reads wait for the WAL position of the client's last write, across "
            "requests)"
        ),
    )
    pooler: Literal["none", "transaction"] = Field(
        default="none",
        description=(
            "none, or transaction when PgBouncer, PgCat or PgDog in transaction pooling "
            "mode sits in front of the nodes (then no named prepared statements)"
        ),
    )
    consistency_wait: float = Field(
        default=0.25,
        ge=0,
        description=(
            "longest seconds a read waits for a replica to replay the client's last write "
            "before it uses the primary, >= 0"
        ),
    )
    lsn_cookie: str = Field(
        default="rr_lsn",
        pattern=_TOKEN_NAME,
        description="name of the cookie that carries the client's WAL position",
    )
    lsn_header: str = Field(
        default="X-Replica-Router-LSN",
        pattern=_TOKEN_NAME,
        description="name of the request and response header that carries the WAL position",
    )
    lsn_cookie_max_age: int = Field(
        default=300, ge=1, description="seconds the position cookie lives, >= 1"
    )
    lsn_secret: Annotated[SecretStr | None, BeforeValidator(_secret)] = Field(
        default=None,
        description=(
            "key that signs positions (HMAC-SHA256), at least 16 characters; the same on "
            "every worker. Empty: positions are unsigned, and still checked against the "
            "primary"
        ),
    )
    pool_size: int = Field(default=10, ge=1, description="connections kept open per node, >= 1")
    max_overflow: int = Field(
        default=10, ge=0, description="connections per node beyond pool_size under load, >= 0"
    )
    pool_timeout: float = Field(
        default=10.0, gt=0, description="seconds to wait for a free pooled connection, > 0"
    )
    pool_recycle: float = Field(
        default=1800.0, description="seconds before a pooled connection is replaced (-1: never)"
    )
    connect_timeout: float = Field(
        default=3.0, gt=0, description="seconds to open a connection to one node, > 0"
    )
    read_timeout: Annotated[float | None, BeforeValidator(_blank_is_none)] = Field(
        default=5.0,
        gt=0,
        description=(
            "seconds one reader statement may run on a replica; asyncpg cuts it, the replica "
            "is ejected and run_read runs the read elsewhere (psycopg: the server's "
            "statement_timeout). Empty: no bound"
        ),
    )
    checkout_attempts: int = Field(
        default=3, ge=1, description="attempts to get a working connection per session, >= 1"
    )
    checkout_timeout: float = Field(
        default=10.0, gt=0, description="total seconds one checkout may spend retrying, > 0"
    )
    retry_backoff: float = Field(
        default=0.05, ge=0, description="first backoff between checkout retries, in seconds"
    )
    retry_backoff_max: float = Field(
        default=1.0, ge=0, description="longest backoff between checkout retries, in seconds"
    )
    dispose_timeout: float = Field(
        default=5.0, gt=0, description="seconds shutdown waits for each node's pool to close"
    )
    require_at_start: Literal["none", "primary", "all"] = Field(
        default="none",
        description=(
            "none, primary or all: the nodes that must accept a connection (reachable, and "
            "the user, password and database right) when the router starts; otherwise "
            "start() and the app's start-up fail, naming each node and why"
        ),
    )

    def __init__(self, **values: Any) -> None:
        _check_keywords(values, "RouterSettings()")
        prefix = values.get("_env_prefix") or self.model_config.get("env_prefix") or ""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _configuration_error(exc, prefix) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The sources arrive built with the prefix, case rule and .env files in force for
        # this construction (after _env_prefix=, _env_file=, _case_sensitive=): check the
        # names here, before any value is read.
        if isinstance(env_settings, EnvSettingsSource):
            dotenv = dotenv_settings if isinstance(dotenv_settings, DotEnvSettingsSource) else None
            _check_variable_names(settings_cls, env_settings, dotenv)
        return super().settings_customise_sources(
            settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
        )

    @field_validator("replica_urls", mode="before")
    @classmethod
    def _check_replicas(cls, value: Any) -> Any:
        value = _split_urls(value)
        if isinstance(value, list):
            urls = []
            for index, item in enumerate(value, start=1):
                what = f"replica {index}"
                url = parse_url(item, what=what) if isinstance(item, str | URL) else item
                if isinstance(url, URL):
                    split_replica_options(url, what=what)
                urls.append(url)
            return urls
        return value

    @classmethod
    def defaults(cls, **values: Any) -> RouterSettings:
        """Settings from these values and defaults only, never from the environment.

        Errors name the parameter (``pool_size``) rather than a variable.

        Raises:
            TypeError: a keyword that is not a setting (``max_lag_second=``).
            ConfigurationError: a value that is not valid for its setting.
        """
        _check_keywords(values, "RouterSettings.defaults()")
        return cls(_env_prefix=_NO_ENV, _env_file=None, **values)

    def __repr_args__(self) -> Any:
        # URL.__repr__ hides a password in the userinfo, not one in ?password=.
        for key, value in super().__repr_args__():
            if isinstance(value, URL):
                value = mask_url(value)
            elif isinstance(value, list):
                value = [mask_url(v) if isinstance(v, URL) else v for v in value]
            yield key, value


# The keywords BaseSettings itself takes (_env_prefix=, _env_file=, ...).
_SOURCE_KEYWORDS = frozenset(
    name
    for name in inspect.signature(BaseSettings.__init__).parameters
    if name.startswith("_") and name != "__pydantic_self__"
)


def _check_keywords(values: Mapping[str, Any], where: str) -> None:
    """A keyword that is no setting is a TypeError, as for any Python call.

    Without it ``extra="ignore"`` would drop ``max_lag_second=1`` without a word.
    """
    fields = RouterSettings.model_fields
    unknown = [name for name in values if name not in fields and name not in _SOURCE_KEYWORDS]
    if not unknown:
        return
    if len(unknown) == 1:
        (name,) = unknown
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f"did you mean {close[0]!r}?" if close else _README_TABLE
        raise TypeError(f"{where} got an unexpected keyword argument {name!r}; {hint}")
    problems = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(fields), n=1)
        problems.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise TypeError(
        f"{where} got unexpected keyword arguments {', '.join(problems)}; {_README_TABLE}"
    )


def _check_variable_names(
    settings_cls: type[BaseSettings],
    env: EnvSettingsSource,
    dotenv: DotEnvSettingsSource | None,
) -> None:
    """Refuse every variable under the prefix that is neither a setting nor a harness one.

    A typo (``REPLICA_ROUTER_REPLICA_URL``) would otherwise leave its setting at the
    default without a word. Names are compared the way pydantic-settings reads them
    (case-insensitively unless ``case_sensitive``). Variables without the prefix, in the
    environment or in a .env file, are none of our business.
    """
    prefix = env.env_prefix
    if not prefix:
        return  # with no prefix, every variable of the process would look like ours

    def fold(name: str) -> str:
        return name if env.case_sensitive else name.lower()

    allowed = {fold(f"{prefix}{name}") for name in settings_cls.model_fields}
    allowed.update(fold(name) for name in HARNESS_VARIABLES)
    # Spelling suggestions compare what follows the prefix: the long shared prefix would
    # make every name look close to every other.
    candidates = {
        fold(name[len(prefix) :]): name
        for name in HARNESS_VARIABLES
        if fold(name).startswith(fold(prefix))
    }
    candidates.update({fold(name): f"{prefix}{name.upper()}" for name in settings_cls.model_fields})

    found: dict[str, list[str]] = {}

    def collect(names: Iterable[str], where: str) -> None:
        for name in names:
            folded = fold(name)
            if folded.startswith(fold(prefix)) and folded not in allowed:
                places = found.setdefault(name, [])
                if where not in places:
                    places.append(where)

    collect(os.environ, "the environment")
    if dotenv is not None and dotenv.env_file is not None:
        files = dotenv.env_file
        for file in [files] if isinstance(files, str | os.PathLike) else files:
            # A source of its own per file, case-sensitive, to name the variable as
            # written and the file it is in; it reads the file as pydantic-settings does.
            single = DotEnvSettingsSource(
                settings_cls,
                env_file=file,
                env_file_encoding=dotenv.env_file_encoding,
                env_file_depth=dotenv.env_file_depth,
                case_sensitive=True,
            )
            collect(single.env_vars, os.fspath(file))
    if not found:
        return
    lines = []
    for name, places in sorted(found.items()):
        close = difflib.get_close_matches(fold(name)[len(prefix) :], list(candidates), n=1)
        hint = f"did you mean {candidates[close[0]]}?" if close else _README_TABLE
        lines.append(f"{name} is not a setting; {hint} (in {' and '.join(places)})")
    raise ConfigurationError("invalid configuration:\n  " + "\n  ".join(lines))


def _configuration_error(exc: ValidationError, prefix: str) -> ConfigurationError:
    lines = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else "?"
        variable = field if prefix == _NO_ENV else f"{prefix}{field.upper()}"
        info = RouterSettings.model_fields.get(field)
        expected = info.description if info is not None and info.description else ""
        if error["type"] == "value_error":
            # Our own validators' messages already say what is expected.
            lines.append(f"{variable}: {error['msg'].removeprefix('Value error, ')}")
            continue
        got = ""
        if field not in _SECRET_FIELDS and "input" in error:
            got = f" (got {error['input']!r})"
        lines.append(f"{variable}: {error['msg']}{got}; expected {expected}")
    return ConfigurationError("invalid configuration:\n  " + "\n  ".join(lines))
