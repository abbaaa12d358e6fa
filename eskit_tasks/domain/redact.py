"""Masking of secrets in URLs and messages: passwords never reach a log, result or error."""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"

# user:password@host in any scheme://... The password runs to the LAST "@" before the
# path, as URL parsers (urllib, redis-py, kombu) read it, so "p@ss" is masked whole.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^\s/?#]*@")
# password=..., db_password=..., pwd=... in a query string or a libpq connection
# string, quoted ('my secret') or not.
_QUERY_SECRET = re.compile(
    r"(?P<key>\b\w*(?:password|passwd|pwd|secret|token)=)(?:'[^']*'|\"[^\"]*\"|[^&\s;]*)",
    re.IGNORECASE,
)


def mask_url(text: str) -> str:
    """Return ``text`` with URL passwords and ``password=`` parameters replaced by ``***``.

    Works on whole URLs and on messages that contain URLs, even malformed ones.
    """
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", text)


def scrub(message: str, secrets: Iterable[str | None]) -> str:
    """Mask URLs in ``message`` and every known secret value that appears in it verbatim."""
    for secret in secrets:
        if secret:
            message = message.replace(secret, MASK)
    return mask_url(message)
