"""Request deadlines that cost no timer while they are far away.

`async with deadlines.at(when):` works like `asyncio.timeout_at(when)`: at `when` the task is
cancelled and TimeoutError comes out of the block (a cancellation from elsewhere stays a
cancellation). A backend's timeout is minutes long and nearly every request ends long before
it, while a timer (set and cancelled once per request) is one of the larger costs of a proxied
request on uvloop, so a deadline more than two ticks away gets no timer of its own: it waits in
a bucket of `tick` seconds, and one sweep per tick (running only while some deadline waits
in a bucket) sets the timers of the deadlines that come within two ticks, at least a tick ahead
of them. Only the event loop thread uses this.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadlines:
    def __init__(self, tick: float = 1.0) -> None:
        if tick <= 0:
            raise ValueError("tick must be positive")
        self.tick = tick
        self._buckets: dict[int, set[Deadline]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_loop: asyncio.AbstractEventLoop | None = None

    def at(self, when: float, loop: asyncio.AbstractEventLoop | None = None) -> Deadline:
        """A context manager for the running task: TimeoutError at loop time `when`. Passing the
        running loop saves looking it up (a getpid() system call each time)."""
        return Deadline(self, when, loop)

    def __len__(self) -> int:
        """Deadlines waiting for their timer (tests, introspection)."""
        return sum(len(b) for b in self._buckets.values())

    def _park(self, deadline: Deadline, loop: asyncio.AbstractEventLoop) -> int:
        key = int(deadline.when // self.tick)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
        bucket.add(deadline)
        if self._sweep is None or self._sweep_loop is not loop:
            self._sweep_loop = loop
            self._sweep = loop.call_later(self.tick, self._run_sweep)
        return key

    def _unpark(self, deadline: Deadline, key: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.discard(deadline)  # an empty bucket goes at the next sweep (not at once: no churn)

    def _run_sweep(self) -> None:
        loop = self._sweep_loop
        assert loop is not None
        self._sweep = None
        horizon = loop.time() + 2 * self.tick
        for key, bucket in list(self._buckets.items()):
            if not bucket or key * self.tick < horizon:
                del self._buckets[key]
                for deadline in bucket:
                    deadline._arm(loop)
        if self._buckets:
            self._sweep = loop.call_later(self.tick, self._run_sweep)


class Deadline:
    """One use of Deadlines.at (see there); the same rules as asyncio.Timeout."""

    __slots__ = ("_cancelling", "_expired", "_handle", "_key", "_loop", "_owner", "_task", "when")

    def __init__(self, owner: Deadlines, when: float, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._owner = owner
        self._loop = loop
        self.when = when
        self._task: asyncio.Task[object] | None = None
        self._handle: asyncio.Handle | None = None
        self._key: int | None = None
        self._expired = False
        self._cancelling = 0

    @property
    def expired(self) -> bool:
        return self._expired

    async def __aenter__(self) -> Deadline:
        if self._task is not None:
            raise RuntimeError("a Deadline is entered once")
        task = asyncio.current_task(self._loop)
        if task is None:
            raise RuntimeError("Deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        loop = task.get_loop()
        if self.when - loop.time() <= 2 * self._owner.tick:
            self._arm(loop)
        else:
            self._key = self._owner._park(self, loop)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        elif self._key is not None:
            self._owner._unpark(self, self._key)
        self._key = None
        if self._expired:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc  # the cancellation was ours: no one else asked for one

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._key = None
        if self.when <= loop.time():
            self._handle = loop.call_soon(self._expire)
        else:
            self._handle = loop.call_at(self.when, self._expire)

    def _expire(self) -> None:
        self._handle = None
        if self._task is not None and not self._expired:
            self._expired = True
            self._task.cancel()
