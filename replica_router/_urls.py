"""Database URLs: parsed and checked (scheme, hosts, ports, replica options), and shown
with their passwords hidden."""

from __future__ import annotations

import contextlib
import re

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ._exceptions import ConfigurationError

__all__ = ["mask_url", "parse_url", "split_replica_options"]


def mask_url(url: URL) -> str:
    """The URL as text with its password hidden, in the userinfo or the query."""
    if "password" in url.query:
        url = url.update_query_dict({"password": "***"})
    return url.render_as_string(hide_password=True)


# Schemes accepted, and the SQLAlchemy drivername each means.
_SCHEMES = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "postgresql+psycopg": "postgresql+psycopg",
    "postgresql+psycopg_async": "postgresql+psycopg",
}
_URL_EXAMPLE = "postgresql+asyncpg://user:password@host:5432/database"
# Query parameters that configure a replica; removed before the URL reaches asyncpg.
_NAME_OPTION = "replica_name"
_WEIGHT_OPTION = "replica_weight"


def parse_url(value: str | URL, *, what: str) -> URL:
    """Parse and normalise a PostgreSQL URL to the asyncpg driver.

    Args:
        value: the URL, as text or a SQLAlchemy ``URL``.
        what: how to name the value in an error (a variable or parameter name).

    Raises:
        ConfigurationError: not a URL, another scheme, no host, a port outside 1..65535,
            or a ``?host=`` entry that is empty or, among several, lacks a valid port.
            The message never repeats the URL, which may hold a password.
    """
    hosts: tuple[str, ...] = ()
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
        hosts = _host_entries(text, url)
    elif isinstance(value, URL):
        url = value
        hosts = _host_entries(None, url)
    else:
        raise ConfigurationError(f"{what} must be a URL string, got {type(value).__name__}")
    if url.drivername not in _SCHEMES:
        raise ConfigurationError(
            f"{what} has the unsupported scheme {url.drivername!r}; expected "
            "postgresql+asyncpg:// (postgresql:// and postgres:// mean asyncpg too) or "
            "postgresql+psycopg:// (psycopg 3)"
        )
    _check_hosts(url, hosts, what=what)
    if not url.host and "host" not in url.query:
        raise ConfigurationError(f"{what} names no host; expected a URL like {_URL_EXAMPLE}")
    return url.set(drivername=_SCHEMES[url.drivername])


_MULTI_HOST_EXAMPLE = "?host=h1:5432&host=h2:5432"
# What a host name is shown as in an error; anything else (an "@", a password pasted
# into the wrong place) is not repeated.
_PLAIN_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}")


def _host_entries(text: str | None, url: URL) -> tuple[str, ...]:
    """The ``?host=`` values of a URL, blank ones included when the text is at hand."""
    entries = url.query.get("host", ())
    if text is not None and "host=" in text:
        # make_url drops "host=" (blank) entries: a templated ?host=${SECOND} with an unset
        # variable would silently lose a host. keep_blank_values is SQLAlchemy >= 2.1.6;
        # older releases drop the blanks before anyone sees them.
        with contextlib.suppress(TypeError):
            entries = make_url(text, keep_blank_values=True).query.get("host", ())
    return (entries,) if isinstance(entries, str) else tuple(entries)


def _port_problem(port: str) -> str | None:
    """Why ``port`` is not a TCP port ("is ..."), or None."""
    if not port.isdecimal():
        return "is not a number"
    if not 1 <= int(port) <= 65535:
        return f"is {int(port)}, out of range"
    return None


def _check_hosts(url: URL, hosts: tuple[str, ...], *, what: str) -> None:
    """Refuse a port outside 1..65535 and ``?host=`` entries asyncpg cannot use.

    Several entries (``?host=h1:5432&host=h2:5432``) each need ``host:port``: SQLAlchemy's
    asyncpg dialect has no default port there (``create_engine`` raises). One entry may
    be a bare host or a socket directory, which take the URL's port or 5432.
    """
    expected = "expected a number from 1 to 65535"
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ConfigurationError(
            f"{what} has the port {url.port}, out of range; {expected}, like {_URL_EXAMPLE}"
        )
    ports = url.query.get("port", ())
    for port in (ports,) if isinstance(ports, str) else ports:
        for part in port.split(","):
            problem = _port_problem(part.strip()) if part.strip() else None
            if problem is not None:
                raise ConfigurationError(f"{what} has a ?port= value that {problem}; {expected}")
    secrets = [s for s in (url.password, url.query.get("password")) if isinstance(s, str) and s]
    several = len(hosts) > 1
    for number, entry in enumerate(hosts, start=1):
        which = f"?host= entry {number}" if several else "?host= entry"
        if not several and "," in entry:
            # host=h1,h2&port=p1,p2: the ports are in ?port=, checked above.
            if any(not part.strip() for part in entry.split(",")):
                raise ConfigurationError(
                    f"{what} has an empty host in its ?host= list; expected host:port for "
                    f"every host, like {_MULTI_HOST_EXAMPLE}"
                )
            continue
        host, colon, port = entry.partition(":")
        if not host.strip():
            raise ConfigurationError(
                f"{what} has an empty {which}; expected host:port for every host, "
                f"like {_MULTI_HOST_EXAMPLE}"
            )
        if not several and not colon:
            continue  # one bare host, or a Unix socket directory
        plain = _PLAIN_HOST.fullmatch(host) and not any(s in host for s in secrets)
        which += f" ({host!r})" if plain else ""
        if not port:
            need = (
                f"with several hosts each needs one, like {_MULTI_HOST_EXAMPLE}"
                if several
                else "expected host or host:port"
            )
            raise ConfigurationError(f"{what} has a {which} without a port; {need}")
        if ":" in port:
            raise ConfigurationError(
                f"{what} has a {which} that is not host:port; expected entries like "
                f"{_MULTI_HOST_EXAMPLE}"
            )
        problem = _port_problem(port)
        if problem is not None:
            raise ConfigurationError(
                f"{what} has a {which} whose port {problem}; {expected}, like {_MULTI_HOST_EXAMPLE}"
            )


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
