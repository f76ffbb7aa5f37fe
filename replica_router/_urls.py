"""URLs hold passwords: how they are shown."""

from __future__ import annotations

from sqlalchemy.engine import URL

__all__ = ["mask_url"]


def mask_url(url: URL) -> str:
    """The URL as text with its password hidden, in the userinfo or the query."""
    if "password" in url.query:
        url = url.update_query_dict({"password": "***"})
    return url.render_as_string(hide_password=True)
