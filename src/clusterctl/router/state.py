"""Backend health (active checks + passive ejection) and the dispatcher that hands out
concurrency slots, queueing requests while no backend of their chain can take them.

Everything here runs on the event loop thread; no locks.

Health, per backend:

* starting: not yet healthy since the router started (a first deploy starts the router before
  the services behind it). It is in rotation: a request tries it in its place in the chain, and
  a failure (refused, 5xx such as llama-server's 503 while it loads, timed out, broken) moves
  the request on along the chain without counting against the backend: no ejection, no
  cool-down. The first passing check or answered request makes it up. A backend still not
  healthy `startup` seconds after the router started is no longer starting: from then on it
  is treated as up, and its failures eject it as below.
* up (in rotation): every failure (a failed check, or a request that was refused, timed out
  before its first byte, answered 5xx or broke) adds to a run of consecutive failures; any
  success (a passing check, an answered request) ends the run. `failures` in a row eject it.
* ejected: it takes no requests. For `cooldown` seconds it is not even checked; after that it
  is checked every `interval` and comes back after `recoveries` passing checks in a row (a failed
  check starts the count again).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from clusterctl.router.config import Backend, Health


@dataclass(eq=False, slots=True)
class BackendState:
    name: str
    config: Backend
    health: Health
    up: bool = True
    """In rotation: up or starting (see `starting`); False while ejected."""
    starting: bool = False
    """Not yet healthy since the router started (and within its `startup` grace); set by begin()."""
    started_at: float = 0.0
    """When the router started (begin()); a backend is starting until `config.startup` after it."""
    failures: int = 0
    passes: int = 0
    ejected_until: float = 0.0
    in_flight: int = 0
    upstream_key: str | None = None
    last_error: str | None = None
    max_concurrency: int = field(init=False)

    def __post_init__(self) -> None:
        self.max_concurrency = self.config.max_concurrency

    @property
    def available(self) -> bool:
        return self.up and self.in_flight < self.max_concurrency

    @property
    def healthy(self) -> bool:
        """In rotation and seen healthy (not starting, not ejected)."""
        return self.up and not self.starting

    @property
    def state(self) -> str:
        return "starting" if self.up and self.starting else ("up" if self.up else "ejected")

    def begin(self, now: float) -> None:
        """The router starts: the backend is starting for `config.startup` seconds."""
        self.up, self.starting, self.failures, self.passes = True, True, 0, 0
        self.started_at = now

    def still_starting(self, now: float) -> bool:
        """Whether the backend is starting at `now` (its grace ends it: from then on it is up)."""
        if self.starting and now >= self.started_at + self.config.startup:
            self.starting = False
        return self.starting

    def record_failure(self, now: float, reason: str) -> bool:
        """A failed request or check; True when this ejects the backend. A starting backend's
        failures do not count."""
        self.last_error = reason
        if self.still_starting(now):
            return False
        if not self.up:
            self.passes = 0
            return False
        self.failures += 1
        if self.failures >= self.health.failures:
            self.up = False
            self.passes = 0
            self.ejected_until = now + self.health.cooldown
            return True
        return False

    def record_success(self) -> bool:
        """An answered request: ends a run of failures (it does not bring an ejected one back);
        True when it was the first sign of health of a starting backend."""
        if self.up:
            self.failures = 0
            if self.starting:
                self.starting = False
                self.last_error = None
                return True
        return False

    def wants_check(self, now: float) -> bool:
        return self.up or now >= self.ejected_until

    def record_check(self, ok: bool, now: float, reason: str = "") -> bool | None:
        """The result of an active check: True when it brought the backend back, False when it
        ejected it, None otherwise. A starting backend's first passing check makes it up (True):
        it was never out, so `recoveries` does not apply; its failed checks do not count."""
        if self.up:
            if ok:
                self.failures = 0
                if self.starting:
                    self.starting = False
                    self.last_error = None
                    return True
                return None
            if self.still_starting(now):
                self.last_error = reason
                return None
            return False if self.record_failure(now, reason) else None
        if now < self.ejected_until:
            return None
        if not ok:
            self.passes = 0
            self.last_error = reason
            return None
        self.passes += 1
        if self.passes >= self.health.recoveries:
            self.up = True
            self.failures = 0
            self.passes = 0
            self.last_error = None
            return True
        return None


class NoBackend(Exception):
    """No backend of the chain could take the request."""

    def __init__(self, route: str, reason: str) -> None:
        super().__init__(reason)
        self.route = route
        self.reason = reason


class Exhausted(NoBackend):
    """Every backend of the chain was tried for this request."""


class QueueFull(NoBackend):
    pass


class QueueTimeout(NoBackend):
    pass


@dataclass(eq=False, slots=True)
class _Waiter:
    route: str
    chain: tuple[str, ...]
    exclude: frozenset[str]
    future: asyncio.Future[BackendState]


class Dispatcher:
    """Hands out backend slots in chain order; requests that find none wait in one FIFO queue
    (at most `queue_size` of them, each at most `queue_timeout` seconds)."""

    def __init__(self, backends: dict[str, BackendState], queue_size: int, queue_timeout: float,
                 on_depth: Callable[[str, int], None] | None = None,
                 on_wait: Callable[[str], None] | None = None) -> None:
        self.backends = backends
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self._waiters: deque[_Waiter] = deque()
        self._on_depth = on_depth
        self._on_wait = on_wait
        self._depth: dict[str, int] = {}

    @property
    def depth(self) -> int:
        return len(self._waiters)

    def depths(self) -> dict[str, int]:
        return dict(self._depth)

    def try_acquire(self, chain: Iterable[str], exclude: frozenset[str] = frozenset()) -> BackendState | None:
        for name in chain:
            if name in exclude:
                continue
            state = self.backends[name]
            if state.up and state.in_flight < state.max_concurrency:
                state.in_flight += 1
                return state
        return None

    def acquire_nowait(self, chain: Iterable[str], exclude: frozenset[str] = frozenset()) -> BackendState | None:
        """What acquire() would return at once, without a queue to wait in: None when nothing of
        the chain is free now or when requests are queued (they come first; acquire() decides)."""
        if self._waiters:
            return None
        return self.try_acquire(chain, exclude)

    async def acquire(self, route: str, chain: tuple[str, ...],
                      exclude: frozenset[str] = frozenset()) -> BackendState:
        """A slot on the first backend of `chain` (not in `exclude`) that is up and not full;
        waits in the queue when there is none; raises a NoBackend subclass."""
        candidates = [name for name in chain if name not in exclude]
        if not candidates:
            raise Exhausted(route, "every backend of the chain was tried")
        if self._waiters:
            self.pump()  # waiters come first: a newcomer takes only what none of them can use
        state = self.try_acquire(candidates)
        if state is not None:
            return state
        any_up = any(self.backends[name].up for name in candidates)
        why = "every backend is busy" if any_up else "every backend is down"
        if len(self._waiters) >= self.queue_size:
            raise QueueFull(route, why + (" and the queue is full" if self.queue_size else ""))
        future: asyncio.Future[BackendState] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(route, tuple(candidates), frozenset(exclude), future)
        self._waiters.append(waiter)
        self._depth_change(route, +1)
        if self._on_wait is not None:
            self._on_wait(route)
        try:
            async with asyncio.timeout(self.queue_timeout):
                return await future
        except TimeoutError:
            if future.done() and not future.cancelled():
                return future.result()
            any_up = any(self.backends[name].up for name in candidates)
            why = "every backend is busy" if any_up else "every backend is down"
            raise QueueTimeout(route, f"{why} (waited {self.queue_timeout:g} s)") from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())
            raise
        finally:
            if not future.done():
                future.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            self._depth_change(route, -1)

    def release(self, state: BackendState) -> None:
        state.in_flight -= 1
        if self._waiters:
            self.pump()

    def pump(self) -> None:
        """Give free slots to waiters, oldest first (after a release or a recovery)."""
        if not self._waiters:
            return
        for waiter in list(self._waiters):
            if waiter.future.done():
                continue
            state = self.try_acquire(waiter.chain, waiter.exclude)
            if state is not None:
                self._waiters.remove(waiter)
                waiter.future.set_result(state)

    def _depth_change(self, route: str, delta: int) -> None:
        value = self._depth.get(route, 0) + delta
        self._depth[route] = value
        if self._on_depth is not None:
            self._on_depth(route, value)
