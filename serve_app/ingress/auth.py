"""Optional API keys: `Authorization: Bearer <key>`. Keys are compared in constant time and
never logged; they come from an environment variable, never from a config file."""

from __future__ import annotations

import hmac
import os

from serve_app.errors import Unauthorized


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @classmethod
    def from_env(cls, variable: str | None) -> ApiKeys | None:
        if not variable:
            return None
        keys = [k.strip() for k in os.environ.get(variable, "").split(",") if k.strip()]
        if not keys:
            raise RuntimeError(
                f"security.api_keys_env is {variable!r} but that environment variable holds "
                "no keys: set it (comma-separated) or remove api_keys_env")
        return cls(keys)

    def check(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing bearer token (Authorization: Bearer <key>)")
        supplied = token.strip().encode()
        # Check every key, so timing doesn't tell which one was close.
        if not any([hmac.compare_digest(supplied, key) for key in self._keys]):
            raise Unauthorized("invalid API key")
