"""Asynchronous JSON-over-HTTP client for SGLang servers and the router.

Bounded concurrency (a semaphore over all requests), a per-request timeout, retries
with exponential backoff on transport errors, timeouts and 5xx answers (never on 4xx:
those are our bug and are reported at once).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import httpx2

from archer_mcore.rollout.types import RolloutError


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """max_concurrency: requests in flight at once (all servers together).
    request_timeout_s: per request, connect to last byte of the answer.
    max_retries: extra attempts after the first; backoff doubles from backoff_s up to
    backoff_max_s, with +-25% jitter.
    api_key: sent as `Authorization: Bearer <key>` on every request (SGLang's --api-key,
    sglang-router's --api-key and control-plane key); left out of repr."""

    max_concurrency: int = 256
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    max_retries: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    api_key: str | None = field(default=None, repr=False)


class RequestFailed(RolloutError):
    """One HTTP request failed for good. `transport` is True when the server did not
    answer (connection refused/reset, timeout), False for an HTTP error status."""

    def __init__(
        self,
        message: str,
        url: str,
        transport: bool,
        timed_out: bool = False,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.transport = transport
        self.timed_out = timed_out
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.transport or (self.status is not None and self.status >= 500)


def backoff_delay(attempt: int, cfg: ClientConfig, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (1-based)."""
    base = min(cfg.backoff_max_s, cfg.backoff_s * 2 ** (attempt - 1))
    jitter = (rng or random).uniform(0.75, 1.25)
    return base * jitter


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The Authorization header SGLang and sglang-router check (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class AsyncJsonClient:
    """One httpx2.AsyncClient shared by all requests of an engine (create it inside the
    event loop that uses it)."""

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self._client = httpx2.AsyncClient(
            timeout=httpx2.Timeout(cfg.request_timeout_s, connect=cfg.connect_timeout_s),
            limits=httpx2.Limits(
                max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency
            ),
            trust_env=False,
            headers=auth_headers(cfg.api_key),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request_once(
        self,
        method: str,
        url: str,
        json: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """One attempt. Returns the decoded JSON answer (or the text if not JSON).
        Raises RequestFailed."""
        timeout = (
            httpx2.Timeout(timeout_s, connect=min(timeout_s, self.cfg.connect_timeout_s))
            if timeout_s is not None
            else httpx2.USE_CLIENT_DEFAULT
        )
        async with self._sem:
            try:
                r = await self._client.request(method, url, json=json, timeout=timeout)
            except httpx2.TimeoutException as e:
                raise RequestFailed(
                    f"{method} {url} timed out ({type(e).__name__})",
                    url,
                    transport=True,
                    timed_out=True,
                ) from e
            except httpx2.TransportError as e:
                raise RequestFailed(
                    f"{method} {url} failed: {type(e).__name__}: {e}", url, transport=True
                ) from e
        if r.status_code >= 400:
            raise RequestFailed(
                f"{method} {url} answered HTTP {r.status_code}: {r.text[:500]}",
                url,
                transport=False,
                status=r.status_code,
            )
        try:
            return r.json()
        except ValueError:
            return r.text

    async def request(
        self,
        method: str,
        url: str,
        json: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        retries: int | None = None,
    ) -> Any:
        """request_once with retries on transport errors, timeouts and 5xx."""
        retries = self.cfg.max_retries if retries is None else retries
        attempt = 0
        while True:
            try:
                return await self.request_once(method, url, json=json, timeout_s=timeout_s)
            except RequestFailed as e:
                if not e.retryable or attempt >= retries:
                    raise
                attempt += 1
                await asyncio.sleep(backoff_delay(attempt, self.cfg))
