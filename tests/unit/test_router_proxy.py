"""The router against real HTTP upstreams (tests/router_upstream.py processes on 127.0.0.1):
selection, failover, streaming, health, queueing, limits, auth, metrics."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.router_upstream import RouterThread, Upstream, free_port, route_table, upstreams

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def ups() -> Iterator[dict[str, Upstream]]:
    with upstreams("a", "b", "c") as started:
        yield started


@pytest.fixture()
def up(ups: dict[str, Upstream]) -> dict[str, Upstream]:
    for u in ups.values():
        u.reset()
    return ups


MakeRouter = Callable[..., RouterThread]


@pytest.fixture()
def make_router(up: dict[str, Upstream]) -> Iterator[MakeRouter]:
    with contextlib.ExitStack() as stack:
        def make(backends: dict[str, Any] | None = None, routes: dict[str, list[str]] | None = None,
                 **fields: Any) -> RouterThread:
            if backends is None:
                backends = {name: u.url for name, u in up.items()}
            fields.setdefault("health", {"interval": 30.0})
            table = route_table(backends, routes or {"chat": ["a", "b"], "code": ["b"]}, **fields)
            return stack.enter_context(RouterThread(table))

        yield make


def chat(content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **extra}


def metrics(router: RouterThread, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset[Any]], float]:
    text = httpx.get(f"{router.url}/metrics", headers=headers).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def sample(values: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float | None:
    return values.get((name, frozenset(labels.items())))


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def backend_up(router: RouterThread, name: str) -> bool:
    return bool(httpx.get(f"{router.url}/health").json()["backends"][name]["up"])


def backend_state(router: RouterThread, name: str) -> str:
    return str(httpx.get(f"{router.url}/health").json()["backends"][name]["state"])


# -- selection --------------------------------------------------------------------------------


def test_task_route_rewrites_model_and_names_backend(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router()
    resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"))
    assert resp.status_code == 200
    assert resp.headers["X-Clusterctl-Backend"] == "a"
    assert resp.headers["X-Clusterctl-Route"] == "chat"
    body = resp.json()
    assert body["choices"][0]["message"]["content"] == "Hello from a upstream"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    seen = up["a"].requests()
    assert [s["body"]["model"] for s in seen] == ["a-model"]
    assert seen[0]["body"]["messages"] == chat()["messages"]


def test_backend_alias(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router()
    resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="c"))
    assert resp.status_code == 200
    assert (resp.headers["X-Clusterctl-Backend"], resp.headers["X-Clusterctl-Route"]) == ("c", "c")
    assert [s["body"]["model"] for s in up["c"].requests()] == ["c-model"]


def test_task_type_header_overrides_model(make_router: MakeRouter) -> None:
    r = make_router()
    resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"), headers={"X-Task-Type": "code"})
    assert resp.status_code == 200
    assert (resp.headers["X-Clusterctl-Backend"], resp.headers["X-Clusterctl-Route"]) == ("b", "code")
    bad = httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"), headers={"X-Task-Type": "poetry"})
    assert bad.status_code == 404
    assert bad.json()["error"]["message"] == "X-Task-Type 'poetry' is not served here; valid: chat, code"


def test_unknown_model_is_404_listing_valid_names(make_router: MakeRouter) -> None:
    r = make_router(default=["c"])
    resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="gpt-4o"))
    assert resp.status_code == 404
    assert resp.json() == {"error": {
        "message": "model 'gpt-4o' is not served here; valid: auto, a, b, c, chat, code",
        "type": "invalid_request_error", "code": "model_not_found", "param": "model",
        "valid": ["auto", "a", "b", "c", "chat", "code"]}}


def test_models_lists_routes_and_aliases(make_router: MakeRouter) -> None:
    r = make_router(default=["c"])
    data = httpx.get(f"{r.url}/v1/models").json()
    assert data["object"] == "list"
    assert [(m["id"], m["kind"]) for m in data["data"]] == [
        ("auto", "auto"), ("chat", "route"), ("code", "route"), ("a", "backend"), ("b", "backend"),
        ("c", "backend")]


def test_auto_rules_then_default(make_router: MakeRouter) -> None:
    r = make_router(default=["c"], rules=[{"route": "code", "keywords": ["rust", "python"]},
                                          {"route": "chat", "min_prompt_chars": 200}])

    def route_of(content: str, model: str | None = "auto") -> tuple[str, str]:
        body = chat(content) if model is None else chat(content, model=model)
        resp = httpx.post(f"{r.url}{CHAT}", json=body)
        assert resp.status_code == 200, resp.text
        return resp.headers["X-Clusterctl-Route"], resp.headers["X-Clusterctl-Backend"]

    assert route_of("fix my Rust borrow checker error") == ("code", "b")
    assert route_of("long " * 50) == ("chat", "a")
    assert route_of("what's the weather like") == ("default", "c")
    assert route_of("python one-liner please", model=None) == ("code", "b")  # no model: auto
    values = metrics(r)
    assert sample(values, "clusterctl_router_auto_selections_total", route="code", via="rule") == 2
    assert sample(values, "clusterctl_router_auto_selections_total", route="chat", via="rule") == 1
    assert sample(values, "clusterctl_router_auto_selections_total", route="default", via="default") == 1


def test_classifier_picks_route_and_falls_back(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router(default=["a"], classifier={"backend": "c", "routes": ["chat", "code"], "timeout": 1.0},
                    rules=[{"route": "chat", "keywords": ["hello"]}])
    up["c"].set(content="code")
    resp = httpx.post(f"{r.url}{CHAT}", json=chat("write a quicksort", model="auto"))
    assert (resp.headers["X-Clusterctl-Route"], resp.headers["X-Clusterctl-Backend"]) == ("code", "b")
    asked = up["c"].requests()
    assert len(asked) == 1
    assert asked[0]["body"]["model"] == "c-model"
    assert asked[0]["body"]["messages"][0]["role"] == "system"
    assert "chat, code" in asked[0]["body"]["messages"][0]["content"]
    assert asked[0]["body"]["messages"][1] == {"role": "user", "content": "write a quicksort"}
    # a rule that matches wins before the classifier is asked
    resp = httpx.post(f"{r.url}{CHAT}", json=chat("hello friend", model="auto"))
    assert resp.headers["X-Clusterctl-Route"] == "chat"
    assert len(up["c"].requests()) == 1
    # an answer that names no route, an erroring classifier, a slow one: the default chain
    up["c"].set(content="I would say poetry")
    assert httpx.post(f"{r.url}{CHAT}", json=chat("x", model="auto")).headers["X-Clusterctl-Route"] == "default"
    up["c"].set(mode="error", status=500)
    assert httpx.post(f"{r.url}{CHAT}", json=chat("x", model="auto")).headers["X-Clusterctl-Route"] == "default"
    up["c"].set(mode="ok", delay=3.0)
    resp = httpx.post(f"{r.url}{CHAT}", json=chat("x", model="auto"), timeout=30)
    assert (resp.status_code, resp.headers["X-Clusterctl-Route"]) == (200, "default")
    values = metrics(r)
    assert sample(values, "clusterctl_router_auto_selections_total", route="code", via="classifier") == 1
    assert sample(values, "clusterctl_router_auto_selections_total", route="default", via="default") == 3


def test_completions_and_embeddings_are_proxied(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router()
    resp = httpx.post(f"{r.url}/v1/completions", json={"model": "code", "prompt": "one two three"})
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "Hello from b upstream"
    resp = httpx.post(f"{r.url}/v1/embeddings", json={"model": "a", "input": ["ab", "cde"]})
    assert resp.status_code == 200
    assert [d["embedding"][0] for d in resp.json()["data"]] == [2.0, 3.0]
    assert [s["path"] for s in up["b"].requests()] == ["/v1/completions"]
    assert [s["path"] for s in up["a"].requests()] == ["/v1/embeddings"]
    values = metrics(r)
    assert sample(values, "clusterctl_router_tokens_total", route="a", backend="a", direction="in") == 2
    assert sample(values, "clusterctl_router_tokens_total", route="code", backend="b", direction="in") == 3
    assert sample(values, "clusterctl_router_tokens_total", route="code", backend="b", direction="out") == 4


# -- failover ---------------------------------------------------------------------------------


def test_fallback_on_refused_connection(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    r = make_router({"dead": dead, "a": up["a"].url}, {"chat": ["dead", "a"]})
    resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"))
    assert resp.status_code == 200 and resp.headers["X-Clusterctl-Backend"] == "a"
    values = metrics(r)
    assert sample(values, "clusterctl_router_upstream_failures_total", backend="dead", reason="connect") == 1
    assert sample(values, "clusterctl_router_retries_total", route="chat") == 1
    assert sample(values, "clusterctl_router_requests_total", route="chat", backend="a", status="200") == 1


@pytest.mark.parametrize("status", [500, 503])
def test_fallback_on_5xx(make_router: MakeRouter, up: dict[str, Upstream], status: int) -> None:
    r = make_router()
    up["a"].set(mode="error", status=status)
    resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="chat", stream=True))
    assert resp.status_code == 200 and resp.headers["X-Clusterctl-Backend"] == "b"
    assert "data: [DONE]" in resp.text
    assert len(up["a"].requests()) == 1 and len(up["b"].requests()) == 1
    values = metrics(r)
    assert sample(values, "clusterctl_router_upstream_failures_total", backend="a", reason="http_5xx") == 1


def test_fallback_on_timeout_before_first_byte(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router({"a": {"url": up["a"].url, "timeout": 0.5}, "b": up["b"].url})
    up["a"].set(mode="hang")
    resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"), timeout=30)
    assert resp.status_code == 200 and resp.headers["X-Clusterctl-Backend"] == "b"
    values = metrics(r)
    assert sample(values, "clusterctl_router_upstream_failures_total", backend="a", reason="timeout") == 1


def test_last_5xx_is_relayed_and_refusals_are_502(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    dead1, dead2 = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    r = make_router({"a": up["a"].url, "d1": dead1, "d2": dead2}, {"chat": ["a"], "gone": ["d1", "d2"]})
    up["a"].set(mode="error", status=500)
    resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"))
    assert resp.status_code == 500
    assert resp.json() == {"error": {"message": "a fails on purpose", "code": 500}}
    assert resp.headers["X-Clusterctl-Backend"] == "a"
    resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="gone"))
    assert resp.status_code == 502
    error = resp.json()["error"]
    assert error["route"] == "gone" and error["code"] == "upstream_failed"
    # never healthy since the router started: tried, and named as starting
    assert error["message"].startswith(
        "route 'gone': every backend of the chain was tried (d1 (starting): cannot connect (")
    assert "; d2 (starting): cannot connect (" in error["message"]


def test_no_retry_after_the_first_byte(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router()
    up["a"].set(die_after=2)
    lines: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError), \
            httpx.stream("POST", f"{r.url}{CHAT}", json=chat(model="chat", stream=True)) as resp:
        assert resp.status_code == 200 and resp.headers["X-Clusterctl-Backend"] == "a"
        lines.extend(line for line in resp.iter_lines() if line)
    contents = [json.loads(line[6:])["choices"][0]["delta"].get("content") for line in lines]
    assert contents == ["", "Hello ", "from "]  # the role chunk and two words, then the cut
    assert up["b"].requests() == []
    values = metrics(r)
    assert sample(values, "clusterctl_router_streams_truncated_total", route="chat", backend="a") == 1
    assert sample(values, "clusterctl_router_upstream_failures_total", backend="a", reason="stream_aborted") == 1
    assert sample(values, "clusterctl_router_requests_total", route="chat", backend="a", status="200") == 1
    assert sample(values, "clusterctl_router_retries_total", route="chat") is None


def test_stream_is_relayed_as_it_arrives(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router()
    up["a"].set(pause_after=1, pause=1.5)
    arrivals: list[tuple[float, str]] = []
    start = time.monotonic()
    with httpx.stream("POST", f"{r.url}{CHAT}", json=chat(model="chat", stream=True), timeout=30) as resp:
        for line in resp.iter_lines():
            if line:
                arrivals.append((time.monotonic() - start, line))
    first_word = next(t for t, line in arrivals if '"Hello ' in line)
    done = next(t for t, line in arrivals if line == "data: [DONE]")
    # the first word came before the upstream paused; the rest 1.5 s later
    assert done - first_word >= 1.2
    assert first_word < 1.0


def test_stream_usage_is_counted(make_router: MakeRouter) -> None:
    r = make_router()
    body = chat("one two three", model="chat", stream=True, stream_options={"include_usage": True})
    resp = httpx.post(f"{r.url}{CHAT}", json=body)
    assert resp.status_code == 200 and resp.text.endswith("data: [DONE]\n\n")
    values = metrics(r)
    assert sample(values, "clusterctl_router_tokens_total", route="chat", backend="a", direction="in") == 3
    assert sample(values, "clusterctl_router_tokens_total", route="chat", backend="a", direction="out") == 4
    wait_for(lambda: any(line["path"] == CHAT for line in r.log.access()), what="access log line")
    log = [line for line in r.log.access() if line["path"] == CHAT]
    assert (log[0]["tokens_in"], log[0]["tokens_out"], log[0]["status"]) == (3, 4, 200)


# -- health, ejection, queue ------------------------------------------------------------------


def test_passive_ejection_after_consecutive_failures(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router(health={"interval": 60.0, "failures": 2, "cooldown": 60.0})
    up["a"].set(mode="error", status=503)
    for _ in range(2):
        assert httpx.post(f"{r.url}{CHAT}", json=chat(model="chat")).headers["X-Clusterctl-Backend"] == "b"
    assert not backend_up(r, "a")
    for _ in range(3):
        assert httpx.post(f"{r.url}{CHAT}", json=chat(model="chat")).headers["X-Clusterctl-Backend"] == "b"
    assert len(up["a"].requests()) == 2  # ejected: not asked again
    values = metrics(r)
    assert sample(values, "clusterctl_router_backend_up", backend="a") == 0
    assert sample(values, "clusterctl_router_backend_up", backend="b") == 1
    assert sample(values, "clusterctl_router_backend_ejections_total", backend="a") == 1
    assert sample(values, "clusterctl_router_requests_total", route="chat", backend="b", status="200") == 5
    events = [e["event"] for e in r.log.events()]
    assert "backend_ejected" in events


def test_active_ejection_cooldown_and_recovery_after_passing_checks(make_router: MakeRouter,
                                                                   up: dict[str, Upstream]) -> None:
    r = make_router(health={"interval": 0.1, "timeout": 2.0, "failures": 2, "cooldown": 1.5, "recoveries": 3})
    wait_for(lambda: backend_state(r, "a") == "up", what="a up")
    up["a"].set(health=503)
    wait_for(lambda: not backend_up(r, "a"), what="a ejected")
    ejected_checks = up["a"].stats()["health_checks"]
    time.sleep(0.7)  # inside the cool-down: not checked
    assert up["a"].stats()["health_checks"] - ejected_checks <= 1
    wait_for(lambda: up["a"].stats()["health_checks"] >= ejected_checks + 4, what="checks after the cool-down")
    assert not backend_up(r, "a")  # failing checks keep it out
    assert httpx.post(f"{r.url}{CHAT}", json=chat(model="chat")).headers["X-Clusterctl-Backend"] == "b"
    turned = up["a"].stats()["health_checks"]  # read first: every check after this may pass
    up["a"].set(health=200)
    wait_for(lambda: backend_up(r, "a"), what="a recovered")
    assert up["a"].stats()["health_checks"] - turned >= 3
    assert httpx.post(f"{r.url}{CHAT}", json=chat(model="chat")).headers["X-Clusterctl-Backend"] == "a"
    assert [e["event"] for e in r.log.events() if e.get("backend") == "a"] == [
        "backend_ready", "backend_ejected", "backend_recovered"]


def test_a_backend_without_health_path_is_checked_by_connecting(make_router: MakeRouter,
                                                                 up: dict[str, Upstream]) -> None:
    """A custom command with no HTTP health path: the active check is a TCP connect, never a GET."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    gone = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there now
    r = make_router(backends={"a": {"url": up["a"].url, "health_path": None},
                              "b": {"url": gone, "health_path": None, "startup": 0}},
                    routes={"chat": ["b", "a"]},
                    health={"interval": 0.1, "failures": 1, "cooldown": 30.0, "recoveries": 1})
    up["a"].set(health=503)  # would eject an HTTP-checked backend
    wait_for(lambda: not backend_up(r, "b"), what="b ejected")
    time.sleep(0.5)
    assert backend_up(r, "a") and up["a"].stats()["health_checks"] == 0
    assert httpx.post(f"{r.url}{CHAT}", json=chat(model="chat")).headers["X-Clusterctl-Backend"] == "a"
    reason = next(e["reason"] for e in r.log.events() if e.get("event") == "backend_ejected")
    assert reason == "health connect"


def test_queue_times_out_with_503_naming_the_route(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router(routes={"chat": ["a"]}, queue={"size": 4, "timeout": 0.5},
                    health={"interval": 0.1, "failures": 1, "cooldown": 0.0, "recoveries": 1})
    wait_for(lambda: backend_state(r, "a") == "up", what="a up")  # healthy once: it can be ejected
    up["a"].set(health=503)
    wait_for(lambda: not backend_up(r, "a"), what="a ejected")
    start = time.monotonic()
    resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"), timeout=30)
    assert time.monotonic() - start >= 0.45
    assert resp.status_code == 503
    assert resp.headers["X-Clusterctl-Route"] == "chat"
    assert resp.json() == {"error": {"message": "route 'chat': every backend is down (waited 0.5 s)",
                                     "type": "service_unavailable", "code": "no_backend_available",
                                     "route": "chat"}}
    assert up["a"].requests() == []


def test_full_queue_answers_503_at_once(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router(routes={"chat": ["a"]}, queue={"size": 0, "timeout": 5.0},
                    health={"interval": 0.1, "failures": 1, "cooldown": 0.0, "recoveries": 1})
    wait_for(lambda: backend_state(r, "a") == "up", what="a up")  # healthy once: it can be ejected
    up["a"].set(health=503)
    wait_for(lambda: not backend_up(r, "a"), what="a ejected")
    resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"))
    assert resp.status_code == 503
    assert resp.json()["error"]["message"] == "route 'chat': every backend is down"


def test_queued_request_is_served_when_a_backend_recovers(make_router: MakeRouter,
                                                         up: dict[str, Upstream]) -> None:
    r = make_router(routes={"chat": ["a"]}, queue={"size": 4, "timeout": 20.0},
                    health={"interval": 0.1, "failures": 1, "cooldown": 0.0, "recoveries": 2})
    wait_for(lambda: backend_state(r, "a") == "up", what="a up")  # healthy once: it can be ejected
    up["a"].set(health=503)
    wait_for(lambda: not backend_up(r, "a"), what="a ejected")
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "resp", httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"), timeout=60)))
    thread.start()
    try:
        wait_for(lambda: httpx.get(f"{r.url}/health").json()["queue_depth"] == 1, what="request queued")
        assert sample(metrics(r), "clusterctl_router_queue_depth", route="chat") == 1
        up["a"].set(health=200)
    finally:
        thread.join(60)
    resp = result["resp"]
    assert resp.status_code == 200 and resp.headers["X-Clusterctl-Backend"] == "a"
    assert sample(metrics(r), "clusterctl_router_queue_depth", route="chat") == 0


def test_backends_not_started_yet_are_tried_and_serve_once_they_answer(make_router: MakeRouter,
                                                                       up: dict[str, Upstream]) -> None:
    """A first deploy: the router starts before the services behind it. Their failed checks and
    refused requests neither eject them nor start a cool-down; the first answer puts them in."""
    late = Upstream("late")  # its port is known, nothing listens there yet
    r = make_router({"late": late.url, "a": up["a"].url}, {"solo": ["late"], "chat": ["late", "a"]},
                    health={"interval": 60.0, "failures": 1, "cooldown": 60.0, "recoveries": 2})
    wait_for(lambda: httpx.get(f"{r.url}/health").json()["backends"]["late"]["last_error"] == "health connect",
             what="late's first check failed")
    assert backend_state(r, "late") == "starting"
    # while it is not there: the chain moves on to `a`, a chain of it alone gets the refusal as 502
    for _ in range(3):
        resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"))
        assert (resp.status_code, resp.headers["X-Clusterctl-Backend"]) == (200, "a")
    resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="solo"))
    assert resp.status_code == 502
    assert resp.json()["error"]["message"].startswith(
        "route 'solo': every backend of the chain was tried (late (starting): cannot connect (")
    try:
        late.start()
        late.set(mode="error", status=503, health=503)  # up, loading its model (llama-server's 503)
        resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"))
        assert (resp.status_code, resp.headers["X-Clusterctl-Backend"]) == (200, "a")
        resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="solo"))
        assert (resp.status_code, resp.json()) == (503, {"error": {"message": "late fails on purpose", "code": 503}})
        assert backend_state(r, "late") == "starting"
        late.set(mode="ok", health=200)  # loaded: the next request is its, no check needed (next in 60 s)
        resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"))
        assert (resp.status_code, resp.headers["X-Clusterctl-Backend"]) == (200, "late")
        assert backend_state(r, "late") == "up"
        resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="solo"))
        assert (resp.status_code, resp.headers["X-Clusterctl-Backend"]) == (200, "late")
        assert len(late.requests()) == 4  # 2 while loading, 2 answered
    finally:
        late.stop()
    values = metrics(r)
    assert sample(values, "clusterctl_router_backend_ejections_total", backend="late") is None
    assert sample(values, "clusterctl_router_upstream_failures_total", backend="late", reason="connect") == 4
    assert sample(values, "clusterctl_router_upstream_failures_total", backend="late", reason="http_5xx") == 2
    events = [(e["event"], e.get("via")) for e in r.log.events() if e.get("backend") == "late"]
    assert events == [("backend_ready", "request")]


def test_a_backend_first_healthy_by_its_check_needs_one_pass(make_router: MakeRouter,
                                                            up: dict[str, Upstream]) -> None:
    """Never in rotation before: one passing check is enough (`recoveries` is for coming back)."""
    r = make_router(routes={"chat": ["a"]}, health={"interval": 0.1, "failures": 1, "recoveries": 50})
    wait_for(lambda: backend_state(r, "a") == "up", what="a up")
    ready = [e for e in r.log.events() if e.get("event") == "backend_ready"]
    assert [(e["backend"], e["via"]) for e in ready if e["backend"] == "a"] == [("a", "check")]
    assert up["a"].stats()["health_checks"] < 50


def _concurrent(r: RouterThread, stages: list[tuple[int, Callable[[], bool], str]]) -> list[httpx.Response]:
    """Send requests from threads in stages: each stage's requests, then wait for its condition."""
    results: list[httpx.Response] = []
    threads: list[threading.Thread] = []
    for count, condition, what in stages:
        for _ in range(count):
            thread = threading.Thread(target=lambda: results.append(
                httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"), timeout=60)))
            thread.start()
            threads.append(thread)
        wait_for(condition, what=what)
    for thread in threads:
        thread.join(60)
    return results


def in_flight(r: RouterThread) -> int:
    return sum(b["in_flight"] for b in httpx.get(f"{r.url}/health").json()["backends"].values())


def queue_depth(r: RouterThread) -> int:
    return int(httpx.get(f"{r.url}/health").json()["queue_depth"])


def test_default_queue_holds_requests_beyond_the_chains_slots(make_router: MakeRouter,
                                                              up: dict[str, Upstream]) -> None:
    """8 requests at once to a chain of 6 slots: the 2 beyond them wait for a slot (the default
    queue), none is refused."""
    backends = {name: {"url": u.url, "max_concurrency": 2} for name, u in up.items()}
    r = make_router(backends, {"chat": ["a", "b", "c"]})
    assert r.router.table.queue.size == 64 and r.router.table.queue.timeout == 300.0
    for u in up.values():
        u.set(delay=3.0)
    results = _concurrent(r, [(6, lambda: in_flight(r) == 6, "6 in flight"),
                              (2, lambda: queue_depth(r) == 2, "2 queued")])
    assert sorted(resp.status_code for resp in results) == [200] * 8
    assert sorted(u.stats()["max_in_flight"] for u in up.values()) == [2, 2, 2]
    assert sum(u.stats()["served"] for u in up.values()) == 8
    assert sample(metrics(r), "clusterctl_router_queued_total", route="chat") == 2


def test_without_a_queue_requests_beyond_the_slots_get_503_at_once(make_router: MakeRouter,
                                                                  up: dict[str, Upstream]) -> None:
    backends = {name: {"url": u.url, "max_concurrency": 2} for name, u in up.items()}
    r = make_router(backends, {"chat": ["a", "b", "c"]}, queue={"size": 0})
    for u in up.values():
        u.set(delay=3.0)
    refused: list[httpx.Response] = []

    def two_more() -> bool:
        for _ in range(2):
            refused.append(httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"), timeout=60))
        return True

    results = _concurrent(r, [(6, lambda: in_flight(r) == 6, "6 in flight"), (0, two_more, "2 more sent")])
    assert [resp.status_code for resp in results] == [200] * 6
    assert [(resp.status_code, resp.json()["error"]["message"]) for resp in refused] == [
        (503, "route 'chat': every backend is busy")] * 2
    assert sample(metrics(r), "clusterctl_router_queued_total", route="chat") is None


def test_concurrency_limit_makes_excess_wait(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router({"a": {"url": up["a"].url, "max_concurrency": 2}}, {"chat": ["a"]},
                    queue={"size": 10, "timeout": 30.0})
    up["a"].set(delay=0.3)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(
        httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"), timeout=60).status_code)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 6
    stats = up["a"].stats()
    assert stats["served"] == 6 and stats["max_in_flight"] == 2


def test_client_disconnect_cancels_the_upstream_request(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router()
    up["a"].set(pause_after=1, pause=30.0)
    with httpx.stream("POST", f"{r.url}{CHAT}", json=chat(model="chat", stream=True), timeout=30) as resp:
        for line in resp.iter_lines():
            if "Hello" in line:
                break
    wait_for(lambda: up["a"].stats()["cancelled"] == 1, what="upstream request cancelled")
    wait_for(lambda: any(line.get("status") == 499 for line in r.log.access()), what="499 logged")
    assert httpx.get(f"{r.url}/health").json()["backends"]["a"]["in_flight"] == 0


# -- limits, auth -----------------------------------------------------------------------------


def test_request_size_limit(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router(max_request_bytes=2048)
    resp = httpx.post(f"{r.url}{CHAT}", json=chat("x" * 4000, model="chat"))
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "chat", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    resp = httpx.post(f"{r.url}{CHAT}", content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413
    assert httpx.post(f"{r.url}{CHAT}", json=chat("small", model="chat")).status_code == 200
    assert len(up["a"].requests()) == 1


def test_dispatch_of_methods_paths_and_big_bodies(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router()
    resp = httpx.head(f"{r.url}/health")
    assert resp.status_code == 200 and resp.content == b""
    assert httpx.put(f"{r.url}/health").status_code == 405
    assert "X-Clusterctl-Backend" not in httpx.post(f"{r.url}/v1%2Fchat%2Fcompletions", json=chat(model="chat")).headers
    # over aiohttp's own default body limit (1 MiB), under the route table's (8 MiB): forwarded
    resp = httpx.post(f"{r.url}{CHAT}", json=chat("x" * 2_000_000, model="chat"), timeout=30)
    assert resp.headers["X-Clusterctl-Backend"] == "a"


def test_bad_json_is_400(make_router: MakeRouter) -> None:
    r = make_router()
    resp = httpx.post(f"{r.url}{CHAT}", content=b"{nope", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


def test_auth_on_every_path_but_health(make_router: MakeRouter, up: dict[str, Upstream], tmp_path: Path) -> None:
    keys = tmp_path / "clients"
    keys.write_text("sk-client-1\nsk-client-2\n")
    keys.chmod(0o600)
    upkey = tmp_path / "upstream-a"
    upkey.write_text("sk-upstream-a\n")
    upkey.chmod(0o600)
    r = make_router({"a": {"url": up["a"].url, "api_key_file": str(upkey)}, "b": up["b"].url},
                    api_keys_file=str(keys))
    calls = [("POST", CHAT), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("GET", "/v1/models"),
             ("GET", "/metrics"), ("GET", "/nope"), ("GET", CHAT), ("DELETE", "/v1/models")]
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-client-1"}):
        for method, path in calls:
            resp = httpx.request(method, f"{r.url}{path}", headers=headers, json=chat(model="chat"))
            assert resp.status_code == 401, (method, path, headers)
            assert resp.json()["error"]["type"] == "authentication_error"
            assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(f"{r.url}/health").status_code == 200
    assert up["a"].requests() == []
    ok = {"Authorization": "Bearer sk-client-2"}
    resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"), headers=ok)
    assert resp.status_code == 200 and resp.headers["X-Clusterctl-Backend"] == "a"
    assert httpx.post(f"{r.url}{CHAT}", json=chat(model="code"), headers=ok).status_code == 200
    assert httpx.get(f"{r.url}/metrics", headers=ok).status_code == 200
    assert httpx.get(f"{r.url}/nope", headers=ok).status_code == 404
    assert httpx.get(f"{r.url}{CHAT}", headers=ok).status_code == 405
    # the upstream gets its own key, never the client's
    assert [s["authorization"] for s in up["a"].requests()] == ["Bearer sk-upstream-a"]
    assert [s["authorization"] for s in up["b"].requests()] == [None]
    logged = json.dumps(r.log.lines)
    assert "sk-client" not in logged and "sk-upstream" not in logged


def test_health_reports_state_without_secrets(make_router: MakeRouter, up: dict[str, Upstream],
                                              tmp_path: Path) -> None:
    upkey = tmp_path / "k"
    upkey.write_text("sk-secret\n")
    upkey.chmod(0o600)
    dead, later = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    r = make_router({"a": {"url": up["a"].url, "api_key_file": str(upkey)}, "dead": {"url": dead, "startup": 0},
                     "later": later},
                    {"chat": ["a"], "gone": ["dead"], "soon": ["later", "a"]},
                    health={"interval": 0.1, "failures": 1, "cooldown": 30.0})
    wait_for(lambda: not backend_up(r, "dead"), what="dead ejected")
    wait_for(lambda: backend_up(r, "a"), what="a up")
    resp = httpx.get(f"{r.url}/health")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "degraded"
    assert body["routes"] == {"chat": {"up": True, "backends_up": ["a"], "backends_starting": []},
                              "gone": {"up": False, "backends_up": [], "backends_starting": []},
                              "soon": {"up": True, "backends_up": ["a"], "backends_starting": ["later"]}}
    assert body["backends"]["a"] == {"state": "up", "up": True, "in_flight": 0, "max_concurrency": 64,
                                     "consecutive_failures": 0, "last_error": None}
    # `later` never answered, but within its startup grace: starting, its failures not counted
    wait_for(lambda: httpx.get(f"{r.url}/health").json()["backends"]["later"]["last_error"] is not None,
             what="a failed check of later")
    assert httpx.get(f"{r.url}/health").json()["backends"]["later"] == {
        "state": "starting", "up": False, "in_flight": 0, "max_concurrency": 64, "consecutive_failures": 0,
        "last_error": "health connect"}
    assert body["backends"]["dead"] == {"state": "ejected", "up": False, "in_flight": 0, "max_concurrency": 64,
                                        "consecutive_failures": 1, "last_error": "health connect"}
    text = resp.text
    assert "127.0.0.1" not in text and "sk-secret" not in text and str(upkey) not in text


def test_access_log_lines(make_router: MakeRouter) -> None:
    r = make_router()
    httpx.post(f"{r.url}{CHAT}", json=chat("a secret prompt", model="chat"))
    wait_for(lambda: any(line["path"] == CHAT for line in r.log.access()), what="access log line")
    line = next(line for line in r.log.access() if line["path"] == CHAT)
    assert {k: line[k] for k in ("method", "route", "backend", "status", "bytes", "tokens_in", "tokens_out")} == {
        "method": "POST", "route": "chat", "backend": "a", "status": 200, "bytes": line["bytes"],
        "tokens_in": 3, "tokens_out": 4}
    assert line["bytes"] > 100 and line["ttfb_ms"] > 0 and line["duration_ms"] >= line["ttfb_ms"]
    assert "secret" not in json.dumps(r.log.lines)
    r2 = make_router(log_prompts=True)
    httpx.post(f"{r2.url}{CHAT}", json=chat("a secret prompt", model="chat"))
    wait_for(lambda: any(line["path"] == CHAT for line in r2.log.access()), what="access log line")
    assert next(line for line in r2.log.access() if line["path"] == CHAT)["prompt"] == "a secret prompt"


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_after_a_known_sequence(make_router: MakeRouter, up: dict[str, Upstream]) -> None:
    r = make_router()
    for _ in range(3):
        assert httpx.post(f"{r.url}{CHAT}", json=chat("one two", model="chat")).status_code == 200
    body = chat("one two three four", model="code", stream=True, stream_options={"include_usage": True})
    assert httpx.post(f"{r.url}{CHAT}", json=body).status_code == 200
    up["a"].set(mode="error", status=502)
    assert httpx.post(f"{r.url}{CHAT}", json=chat("x", model="chat")).headers["X-Clusterctl-Backend"] == "b"
    assert httpx.post(f"{r.url}{CHAT}", json=chat("x", model="nope")).status_code == 404
    values = metrics(r)
    expected = {
        ("clusterctl_router_requests_total", (("route", "chat"), ("backend", "a"), ("status", "200"))): 3,
        ("clusterctl_router_requests_total", (("route", "code"), ("backend", "b"), ("status", "200"))): 1,
        ("clusterctl_router_requests_total", (("route", "chat"), ("backend", "b"), ("status", "200"))): 1,
        ("clusterctl_router_requests_total", (("route", "none"), ("backend", "none"), ("status", "404"))): 1,
        ("clusterctl_router_tokens_total", (("route", "chat"), ("backend", "a"), ("direction", "in"))): 6,
        ("clusterctl_router_tokens_total", (("route", "chat"), ("backend", "a"), ("direction", "out"))): 12,
        ("clusterctl_router_tokens_total", (("route", "code"), ("backend", "b"), ("direction", "in"))): 4,
        ("clusterctl_router_tokens_total", (("route", "code"), ("backend", "b"), ("direction", "out"))): 4,
        ("clusterctl_router_tokens_total", (("route", "chat"), ("backend", "b"), ("direction", "in"))): 1,
        ("clusterctl_router_tokens_total", (("route", "chat"), ("backend", "b"), ("direction", "out"))): 4,
        ("clusterctl_router_ttfb_seconds_count", (("route", "chat"), ("backend", "a"))): 3,
        ("clusterctl_router_request_duration_seconds_count", (("route", "code"), ("backend", "b"))): 1,
        ("clusterctl_router_upstream_failures_total", (("backend", "a"), ("reason", "http_5xx"))): 1,
        ("clusterctl_router_retries_total", (("route", "chat"),)): 1,
        ("clusterctl_router_backend_up", (("backend", "a"),)): 1,
        ("clusterctl_router_in_flight", (("backend", "a"),)): 0,
        ("clusterctl_router_in_flight", (("backend", "b"),)): 0,
        ("clusterctl_router_queue_depth", (("route", "chat"),)): 0,
    }
    got = {(name, labels): values.get((name, frozenset(labels))) for name, labels in expected}
    assert got == expected
    requests = {k: v for k, v in values.items() if k[0] == "clusterctl_router_requests_total"}
    assert sum(requests.values()) == 6
    assert sum(v for (name, _), v in values.items() if name == "clusterctl_router_ttfb_seconds_count") == 5


def test_dropped_keep_alive_connection_is_retried_once_on_a_new_one(make_router: MakeRouter,
                                                                    up: dict[str, Upstream]) -> None:
    r = make_router()
    assert httpx.post(f"{r.url}{CHAT}", json=chat(model="chat")).headers["X-Clusterctl-Backend"] == "a"
    up["a"].set(mode="close")  # from now on a closes every connection without answering
    resp = httpx.post(f"{r.url}{CHAT}", json=chat(model="chat"))
    assert resp.status_code == 200 and resp.headers["X-Clusterctl-Backend"] == "b"
    assert len(up["a"].requests()) == 3  # the first answer, then the pooled connection and a new one
    values = metrics(r)
    assert sample(values, "clusterctl_router_upstream_failures_total", backend="a", reason="disconnected") == 1
    assert sample(values, "clusterctl_router_retries_total", route="chat") == 1
