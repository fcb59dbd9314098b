"""What stands between the network and the funnel: the body guard, safe error bodies, the API token.

- `BodyGuard` (a plain ASGI middleware) reads a request body before the app does, at most
  `max_bytes` of it, whether or not it has a Content-Length (a chunked body is counted as it
  arrives): an oversized body is a 413 (the rest is read and discarded, up to `drain_bytes`,
  so the client gets the answer instead of a reset connection); a body that is not UTF-8 is a
  400; JSON holding NaN, Infinity or a number that overflows a float is a 422. The body it
  read is then replayed to the app.
- `validation_error_body` renders a validation error whatever the input held (NaN, bytes,
  objects the JSON encoder refuses): every value that is not plain JSON becomes its repr.
- The API token: a bearer token read from the environment (`FUNNEL_API_TOKEN`) or from a
  file (`serve.token_file`, created with a random token by the jobs that deploy the funnel,
  mode 0600), never from the repository. Compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

TOKEN_ENV = "FUNNEL_API_TOKEN"
DRAIN_BYTES = 64 * 1024 * 1024


class _NonFinite(ValueError):
    pass


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise _NonFinite(f"number {s[:40]} overflows a float")
    return v


def _no_constant(s: str) -> float:
    raise _NonFinite(f"{s} is not JSON (NaN and Infinity are refused)")


def non_finite_reason(text: str) -> str | None:
    """Why a JSON text holds a non-finite number (NaN, ±Infinity, 1e999), or None. Syntax errors
    are not reported here: the app's own parser names them (422)."""
    try:
        json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except _NonFinite as e:
        return str(e)
    except (ValueError, RecursionError):
        return None
    return None


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    if v is None or isinstance(v, str | int | bool):
        return v
    return repr(v)[:200]


def validation_error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """{"detail": [...]} that always renders: the inputs shortened, non-JSON values as repr."""
    out = []
    for e in errors:
        e = {k: v for k, v in e.items() if k != "url"}
        if isinstance(e.get("input"), str) and len(e["input"]) > 200:
            e["input"] = e["input"][:200] + "…"
        out.append(_json_safe(e))
    return {"detail": out}


async def _answer(scope, receive, send, status: int, detail: str) -> None:
    await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


class BodyGuard:
    def __init__(self, app, max_bytes: int, drain_bytes: int = DRAIN_BYTES):
        self.app, self.max_bytes, self.drain_bytes = app, max_bytes, drain_bytes

    async def _drain(self, receive, already: int) -> None:
        """Read and drop the rest of the body (bounded), so the client can read the 413."""
        n = already
        while n < self.drain_bytes:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            n += len(msg.get("body", b""))
            if not msg.get("more_body"):
                return

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"payload larger than {self.max_bytes} bytes"
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_bytes):
            await self._drain(receive, 0)
            return await _answer(scope, receive, send, 413 if size.isdigit() else 400,
                                 too_big if size.isdigit() else "Content-Length is not a number")
        chunks, n = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunk = msg.get("body", b"")
            n += len(chunk)
            if n > self.max_bytes:
                if msg.get("more_body"):
                    await self._drain(receive, n)
                return await _answer(scope, receive, send, 413, too_big)
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await _answer(scope, receive, send, 400, f"body is not UTF-8 (invalid byte at offset {e.start})")
        reason = non_finite_reason(text) if text.strip() else None
        if reason:
            return await _answer(scope, receive, send, 422, reason)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# --------------------------------------------------------------------------- the API token


def ensure_token_file(path: str | Path) -> Path:
    """The token file, created with a random token (mode 0600) if it does not exist."""
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return p


def read_token(token_file: str | Path | None) -> str:
    """FUNNEL_API_TOKEN if set, else the first line of `token_file`; a clear error if neither."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    if token_file and Path(token_file).is_file():
        tok = Path(token_file).read_text().strip().splitlines()
        if tok and tok[0].strip():
            return tok[0].strip()
    raise ValueError(f"no API token: set {TOKEN_ENV} or write one to serve.token_file ({token_file or 'unset'}); "
                     f"`python -m serving.guard --new-token FILE` writes a random one")


def token_matches(expected: str, authorization: str | None) -> bool:
    if not authorization or not authorization.startswith("Bearer "):
        return False
    return hmac.compare_digest(authorization[7:].strip().encode(), expected.encode())


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "--new-token":
        raise SystemExit("usage: python -m serving.guard --new-token FILE")
    print(ensure_token_file(sys.argv[2]))
