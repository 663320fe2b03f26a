"""The router's Prometheus metrics (one registry per server; labelled children are cached)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

PREFIX = "clusterctl_router"
NONE = "none"
"""The route/backend label of a request that never got that far (401, 404, 413...)."""

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0, 300.0, 600.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


StateSource = Callable[[], tuple[Mapping[str, str], Mapping[str, int], Mapping[str, int]]]
"""Returns (backend -> state: starting, up or ejected; backend -> requests in flight; route ->
queue depth) at scrape time."""


class _StateCollector(Collector):
    def __init__(self, source: StateSource) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        states, in_flight, depth = self.source()
        g = GaugeMetricFamily(f"{PREFIX}_backend_up", "1 when the backend is in rotation and has been healthy, "
                              "0 when ejected or still starting", labels=["backend"])
        for name, value in sorted(states.items()):
            g.add_metric([name], 1.0 if value == "up" else 0.0)
        yield g
        g = GaugeMetricFamily(f"{PREFIX}_backend_starting", "1 while the backend has not been healthy since the "
                              "router started (tried, failures not counted)", labels=["backend"])
        for name, value in sorted(states.items()):
            g.add_metric([name], 1.0 if value == "starting" else 0.0)
        yield g
        g = GaugeMetricFamily(f"{PREFIX}_in_flight", "Requests in flight to each backend", labels=["backend"])
        for name, count in sorted(in_flight.items()):
            g.add_metric([name], float(count))
        yield g
        g = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting for a backend, by route",
                              labels=["route"])
        for name, count in sorted(depth.items()):
            g.add_metric([name], float(count))
        yield g


class _RequestSeries:
    """The labelled children one (route, backend, status) of requests counts into; a child is
    made (and so shows in the exposition) when it is first counted into, as `.labels()` would."""

    __slots__ = ("duration", "requests", "tokens_in", "tokens_out", "ttfb")

    def __init__(self, requests: Any, duration: Any) -> None:
        self.requests = requests
        self.duration = duration
        """None for requests that reached no backend: they have no latency series."""
        self.ttfb: Any = None
        self.tokens_in: Any = None
        self.tokens_out: Any = None


class Metrics:
    def __init__(self, state: StateSource) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Client requests by route, backend and HTTP status sent",
                                ["route", "backend", "status"], registry=r)
        self.ttfb = Histogram(f"{PREFIX}_ttfb_seconds", "Time from request to the first response byte sent",
                              ["route", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds", "Time from request to the last byte sent",
                                  ["route", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter(f"{PREFIX}_tokens", "Tokens from upstream usage reports (in = prompt, out = completion)",
                              ["route", "backend", "direction"], registry=r)
        self.upstream_failures = Counter(f"{PREFIX}_upstream_failures",
                                         "Failed upstream attempts by backend and reason", ["backend", "reason"],
                                         registry=r)
        self.retries = Counter(f"{PREFIX}_retries", "Requests sent on to the next backend of their chain",
                               ["route"], registry=r)
        self.truncated = Counter(f"{PREFIX}_streams_truncated",
                                 "Streams cut because the upstream failed after the first byte was sent",
                                 ["route", "backend"], registry=r)
        self.auto = Counter(f"{PREFIX}_auto_selections", "model=auto requests by chosen route and how (rule, "
                            "classifier, default)", ["route", "via"], registry=r)
        self.queued = Counter(f"{PREFIX}_queued", "Requests that waited in the queue for a backend slot",
                              ["route"], registry=r)
        self.ejections = Counter(f"{PREFIX}_backend_ejections", "Times a backend was taken out of rotation",
                                 ["backend"], registry=r)
        r.register(_StateCollector(state))
        self._children: dict[tuple[Any, ...], Any] = {}
        self._series: dict[tuple[str, str, int], _RequestSeries] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            self._children[key] = child
        return child

    def request(self, route: str, backend: str, status: int, ttfb: float | None, duration: float,
                tokens_in: int | None, tokens_out: int | None) -> None:
        series = self._series.get((route, backend, status))
        if series is None:
            series = self._series[(route, backend, status)] = _RequestSeries(
                self._child(self.requests, route, backend, str(status)),
                None if backend == NONE else self._child(self.duration, route, backend))
        series.requests.inc()
        if series.duration is not None:
            if ttfb is not None:
                if series.ttfb is None:
                    series.ttfb = self._child(self.ttfb, route, backend)
                series.ttfb.observe(ttfb)
            series.duration.observe(duration)
        if tokens_in:
            if series.tokens_in is None:
                series.tokens_in = self._child(self.tokens, route, backend, "in")
            series.tokens_in.inc(tokens_in)
        if tokens_out:
            if series.tokens_out is None:
                series.tokens_out = self._child(self.tokens, route, backend, "out")
            series.tokens_out.inc(tokens_out)

    def failure(self, backend: str, reason: str) -> None:
        self._child(self.upstream_failures, backend, reason).inc()

    def retry(self, route: str) -> None:
        self._child(self.retries, route).inc()

    def truncated_stream(self, route: str, backend: str) -> None:
        self._child(self.truncated, route, backend).inc()

    def auto_selection(self, route: str, via: str) -> None:
        self._child(self.auto, route, via).inc()

    def queued_request(self, route: str) -> None:
        self._child(self.queued, route).inc()

    def ejected(self, backend: str) -> None:
        self._child(self.ejections, backend).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
