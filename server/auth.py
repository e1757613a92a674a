"""Per-client bearer tokens (``authorization: Bearer <token>``), shared by gRPC and HTTP.

Tokens come from a file (one ``<client> <token>`` or bare ``<token>`` a line, ``#`` comments) and/or
``$PALETTELINK_TOKENS`` (``client=token,client2=token2``). Each token names its client, which labels
that client's streams. Comparison is constant-time. With no tokens configured, auth is off.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from palettelink.errors import InvalidRequest, Unauthenticated

ENV = "PALETTELINK_TOKENS"


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
        given = token.strip().encode()
        found = ""
        for t, client in self._tokens:  # check all, so timing does not reveal which one matched
            if hmac.compare_digest(t, given):
                found = client
        if not found:
            raise Unauthenticated("unknown token")
        return found
