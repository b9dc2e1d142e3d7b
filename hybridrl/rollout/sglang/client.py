"""Async HTTP client for an SGLang server (or `hybridrl serve`): pooled, timed, retried.

    client = HTTPClient("http://127.0.0.1:30000", timeout=600)
    body = await client.post("/generate", {"input_ids": [1, 2], "sampling_params": {...}})
    await client.close()

Retries with exponential backoff on connection errors and 5xx replies, never on 4xx (a 4xx is
the server saying no: it raises `ServerError` with the server's reason at once). Every request
carries an `X-Request-Id` header. Every wait is bounded by a timeout.
"""
from __future__ import annotations

import asyncio
import json
import uuid

from hybridrl import HybridRLError

RETRY_STATUSES = range(500, 600)
KEEPALIVE_S = 2.0


class RequestTimeout(HybridRLError):
    """The server took longer than the request's timeout (the request may still run there)."""


class ServerError(HybridRLError):
    """The server answered with an error status; `.status` and `.reason` hold what it said."""

    def __init__(self, message: str, status: int, reason: str):
        super().__init__(message)
        self.status, self.reason = status, reason


def reason_of(text: str) -> str:
    """The human part of an error body: SGLang sends {"error": {"message"}}, {"message"} or {"detail"}."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:2000]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        for key in ("message", "detail"):
            if key in body:
                return str(body[key])
    return text.strip()[:2000]


class HTTPClient:
    def __init__(self, base_url: str, *, timeout: float = 600.0, connect_timeout: float = 10.0,
                 retries: int = 3, backoff: float = 0.5, max_connections: int = 1024, keepalive: float = KEEPALIVE_S):
        self.base_url = base_url.rstrip("/")
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.retries, self.backoff = retries, backoff
        self.max_connections, self.keepalive = max_connections, keepalive
        self._session, self._loop = None, None
        self.retried: list[str] = []     # "path: error" of each retried attempt (diagnostics, benchmarks)

    def _get_session(self):
        """One pooled session per event loop (a new asyncio.run gets a new session)."""
        import aiohttp
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            _drop(self._session)
            self._loop = loop
            # Idle pooled connections are dropped before the server's keep-alive (uvicorn, SGLang: 5 s)
            # closes them, or a request sent on a half-closed socket fails with "Server disconnected".
            connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=self.keepalive)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            if self._loop is asyncio.get_running_loop():
                await self._session.close()
            else:
                _drop(self._session)
        self._session = None

    async def get(self, path: str, **kw):
        return await self.request("GET", path, None, **kw)

    async def post(self, path: str, body: dict | None = None, **kw):
        return await self.request("POST", path, body, **kw)

    async def request(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = None,
                      retries: int | None = None, request_id: str | None = None):
        """Send one request; returns the parsed JSON body (or text, or None when empty)."""
        retries = self.retries if retries is None else retries
        rid = request_id or uuid.uuid4().hex
        last = None
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return await self._once(method, path, body, timeout or self.timeout, rid)
            except ServerError as e:
                if e.status not in RETRY_STATUSES:
                    raise
                last = e
                self.retried.append(f"{path}: {e}")
            except Exception as e:
                if not _is_connection_error(e):
                    if isinstance(e, asyncio.TimeoutError):
                        raise RequestTimeout(
                            f"{method} {self.base_url}{path} timed out after {timeout or self.timeout:.0f} s "
                            f"(request id {rid}): raise rollout.request_timeout or check the server") from None
                    raise
                last = e
                self.retried.append(f"{path}: {type(e).__name__}: {e}")
        raise HybridRLError(f"{method} {self.base_url}{path} failed after {retries + 1} attempts "
                            f"(request id {rid}): {type(last).__name__}: {last}") from last

    async def _once(self, method: str, path: str, body, timeout: float, rid: str):
        import aiohttp
        to = aiohttp.ClientTimeout(total=timeout, sock_connect=self.connect_timeout)
        async with self._get_session().request(method, self.base_url + path, json=body, timeout=to,
                                               headers={"X-Request-Id": rid}) as resp:
            text = await resp.text()
            if resp.status >= 400:
                reason = reason_of(text)
                raise ServerError(f"{method} {path} → HTTP {resp.status}: {reason}", resp.status, reason)
            if not text:
                return None
            try:
                return json.loads(text)
            except ValueError:
                return text


def _is_connection_error(e: BaseException) -> bool:
    """Refused, reset, dropped mid-reply, or no connection within connect_timeout: worth a retry."""
    import aiohttp
    if isinstance(e, (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
        return not isinstance(e, aiohttp.SocketTimeoutError)
    return isinstance(e, ConnectionError)


def _drop(session) -> None:
    """Forget a session made in an event loop that is gone (it cannot be awaited closed any more)."""
    if session is None or session.closed:
        return
    connector = session.connector
    session.detach()
    try:
        connector._close()          # sync close of the pooled sockets; private but stable across aiohttp 3.x
    except Exception:  # noqa: BLE001 - best effort cleanup of a dead loop's sockets
        pass
