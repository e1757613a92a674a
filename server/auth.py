"""Per-client bearer tokens (``authorization: Bearer <token>``), shared by gRPC and HTTP.

Tokens come from a file (one ``<client> <token>`` or bare ``<token>`` a line, ``#`` comments) and/or
``$PALETTELINK_TOKENS`` (``client=token,client2=token2``). Each token names its client, which labels
that client's streams. Comparison is constant-time. With no tokens configured, auth is off.

Browsers cannot send a header on a page load or an ``EventSource``, so the dashboard's login form
trades a token for a *session*: ``v1.<expiry>.<client>.<mac>``, the MAC an HMAC-SHA256 keyed with the
token itself. The browser never holds the token; every replica with the same tokens accepts the
session (no shared state); removing a token from the file ends its sessions at the next restart, and
each session ends by itself after :data:`SESSION_TTL_S`. Stdlib only: ``server.main`` imports this
module before it checks that the ``server`` extra is installed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Mapping
from pathlib import Path

from palettelink.errors import InvalidRequest, Unauthenticated

ENV = "PALETTELINK_TOKENS"
SESSION_TTL_S = 12 * 3600  # a dashboard login lasts a working day, then the form asks again
_SESSION_V = "v1"


class TokenAuth:
    def __init__(self, tokens: Mapping[str, str]) -> None:
        """``tokens``: token → client name."""
        self._tokens = [(t.encode(), c) for t, c in tokens.items() if t]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    @classmethod
    def from_sources(cls, path: str | os.PathLike[str] | None = None, env: str | None = ENV) -> TokenAuth:
        tokens: dict[str, str] = {}
        if path:
            try:
                lines = Path(path).read_text().splitlines()
            except OSError as e:
                raise InvalidRequest(f"cannot read tokens file {path}: {e}") from e
            for i, raw in enumerate(lines):
                parts = raw.split("#", 1)[0].split()
                if len(parts) == 1:
                    tokens[parts[0]] = f"client-{i + 1}"
                elif len(parts) == 2:
                    tokens[parts[1]] = parts[0]
                elif parts:
                    raise InvalidRequest(f"{path}:{i + 1}: expected '<client> <token>' or '<token>'")
        for item in (os.environ.get(env, "") if env else "").split(","):
            client, sep, token = item.strip().partition("=")
            if sep and token:
                tokens[token] = client or "client"
        return cls(tokens)

    def client_for(self, authorization: str | None) -> str:
        """The client a ``Bearer`` header belongs to; ``""`` when auth is off."""
        if not self._tokens:
            return ""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing 'authorization: Bearer <token>'")
        return self.client_for_token(token.strip())

    def client_for_token(self, token: str) -> str:
        """The client a bare token belongs to (the login form's field); :class:`Unauthenticated` if none."""
        given = token.encode()
        found = ""
        for t, client in self._tokens:  # check all, so timing does not reveal which one matched
            if hmac.compare_digest(t, given):
                found = client
        if not found:
            raise Unauthenticated("unknown token")
        return found

    # -- browser sessions (the dashboard's cookie) -----------------------------------------------

    def session_for(self, token: str, now: float | None = None, ttl_s: float = SESSION_TTL_S) -> str:
        """A session value for ``token`` (checked first), valid ``ttl_s`` seconds from ``now``."""
        client = self.client_for_token(token)
        expiry = str(int((time.time() if now is None else now) + ttl_s))
        name = _b64(client)
        return f"{_SESSION_V}.{expiry}.{name}.{_mac(token.encode(), expiry, name)}"

    def client_for_session(self, value: str | None, now: float | None = None) -> str:
        """The client of a session value that one of the tokens signed and that has not expired;
        :class:`Unauthenticated` otherwise (also for junk: the value comes from a cookie)."""
        if not self._tokens:
            return ""
        value = value or ""
        parts = value.split(".")
        if len(value) > 1024 or not value.isascii() or len(parts) != 4 or parts[0] != _SESSION_V \
                or not parts[1].isdigit():
            raise Unauthenticated("no valid session: log in at /login")
        _, expiry, name, mac = parts
        if int(expiry) < (time.time() if now is None else now):
            raise Unauthenticated("the session has expired: log in again at /login")
        found = ""
        for t, client in self._tokens:  # every token, as in client_for_token
            if hmac.compare_digest(_mac(t, expiry, name).encode(), mac.encode()) and _b64(client) == name:
                found = client
        if not found:
            raise Unauthenticated("no valid session: log in at /login")
        return found


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _mac(token: bytes, expiry: str, name: str) -> str:
    """The session MAC: keyed with the token, over the expiry and the client name it vouches for."""
    msg = f"palettelink-session\0{_SESSION_V}\0{expiry}\0{name}".encode()
    return base64.urlsafe_b64encode(hmac.new(token, msg, hashlib.sha256).digest()).decode().rstrip("=")
