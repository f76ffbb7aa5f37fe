"""Settings, read from ``REPLICA_ROUTER_*`` environment variables by pydantic-settings.

Every field's description is the "what is expected" half of its error message and
the README's configuration table, so the three never drift apart.

Example::

    # REPLICA_ROUTER_PRIMARY_URL=postgresql+asyncpg://app:secret@db-rw:5432/app
    # REPLICA_ROUTER_REPLICA_URLS=postgresql://app:secret@db-ro-1:5432/app,postgresql://app:secret@db-ro-2:5432/app?replica_weight=2
    settings = RouterSettings()
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ._exceptions import ConfigurationError
from ._nodes import mask_url

__all__ = ["ENV_PREFIX", "RouterSettings", "parse_url", "split_replica_options"]

ENV_PREFIX = "REPLICA_ROUTER_"
_ACCEPTED_SCHEMES = {"postgres", "postgresql", "postgresql+asyncpg"}
_URL_EXAMPLE = "postgresql+asyncpg://user:password@host:5432/database"
# Query parameters that configure a replica; removed before the URL reaches asyncpg.
_NAME_OPTION = "replica_name"
# An HTTP token (RFC 9110): what a cookie or header name may contain.
_TOKEN_NAME = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
_WEIGHT_OPTION = "replica_weight"


def parse_url(value: str | URL, *, what: str) -> URL:
    """Parse and normalise a PostgreSQL URL to the asyncpg driver.

    Args:
        value: the URL, as text or a SQLAlchemy ``URL``.
        what: how to name the value in an error (a variable or parameter name).

    Raises:
        ConfigurationError: not a URL, another scheme, or no host. The message never
            repeats the URL, which may hold a password.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ConfigurationError(f"{what} is empty; expected a URL like {_URL_EXAMPLE}")
        try:
            url = make_url(text)
        except (ArgumentError, ValueError):
            # make_url's own message repeats the raw URL, password included.
            raise ConfigurationError(
                f"{what} is not a database URL; expected a URL like {_URL_EXAMPLE}"
            ) from None
    elif isinstance(value, URL):
        url = value
    else:
        raise ConfigurationError(f"{what} must be a URL string, got {type(value).__name__}")
    if url.drivername not in _ACCEPTED_SCHEMES:
        raise ConfigurationError(
            f"{what} has the unsupported scheme {url.drivername!r}; expected "
            "postgresql+asyncpg://, postgresql:// or postgres:// (all use asyncpg)"
        )
    if not url.host and "host" not in url.query:
        raise ConfigurationError(f"{what} names no host; expected a URL like {_URL_EXAMPLE}")
    return url.set(drivername="postgresql+asyncpg")


def split_replica_options(url: URL, *, what: str) -> tuple[URL, str | None, float]:
    """Take the replica options (``replica_name``, ``replica_weight``) out of a URL.

    Returns:
        The URL without those options, the name (or None) and the weight (default 1).
    """
    name = url.query.get(_NAME_OPTION)
    weight_text = url.query.get(_WEIGHT_OPTION)
    if isinstance(name, tuple) or isinstance(weight_text, tuple):
        raise ConfigurationError(f"{what}: {_NAME_OPTION} and {_WEIGHT_OPTION} may appear once")
    weight = 1.0
    if weight_text is not None:
        try:
            weight = float(weight_text)
        except ValueError:
            weight = -1.0
        if not weight > 0 or weight == float("inf"):
            raise ConfigurationError(
                f"{what}: {_WEIGHT_OPTION} must be a number greater than 0, got {weight_text!r}"
            )
    if name is not None and not name.strip():
        raise ConfigurationError(f"{what}: {_NAME_OPTION} must not be empty")
    return url.difference_update_query([_NAME_OPTION, _WEIGHT_OPTION]), name, weight


def _split_urls(value: Any) -> Any:
    if isinstance(value, str):
        return [part for part in (p.strip() for p in value.split(",")) if part]
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
    the prefix). Errors are :class:`ConfigurationError` naming the variable.
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
            "(postgres:// and postgresql:// mean asyncpg; several hosts as "
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
    fallback_max_in_flight: int | None = Field(
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

    def __init__(self, **values: Any) -> None:
        prefix = values.get("_env_prefix") or self.model_config.get("env_prefix") or ""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _configuration_error(exc, prefix) from None

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
        """
        return cls(_env_prefix=_NO_ENV, _env_file=None, **values)

    def __repr_args__(self) -> Any:
        # URL.__repr__ hides a password in the userinfo, not one in ?password=.
        for key, value in super().__repr_args__():
            if isinstance(value, URL):
                value = mask_url(value)
            elif isinstance(value, list):
                value = [mask_url(v) if isinstance(v, URL) else v for v in value]
            yield key, value


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
