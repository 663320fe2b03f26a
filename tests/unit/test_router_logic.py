"""The router's pure parts: route table checks, selection, health state, the dispatcher, keys,
usage parsing; and `clusterctl router check`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.inventory import load_inventory
from clusterctl.render import route_table
from clusterctl.router.config import Backend, Health, Queue, RouteTable
from clusterctl.router.keys import ClientKeys, KeyFileError, read_upstream_key
from clusterctl.router.selection import Selector, UnknownModel, parse_classifier_answer, prompt_texts
from clusterctl.router.server import find_usage
from clusterctl.router.state import BackendState, Dispatcher, Exhausted, QueueFull, QueueTimeout
from clusterctl.router.validate import problems

runner = CliRunner()


def table(**fields: Any) -> RouteTable:
    data: dict[str, Any] = {
        "cluster": "c",
        "backends": {"big": {"url": "http://10.0.0.11:8080", "model": "big-q8"},
                     "small": {"url": "http://10.0.0.12:8080/v1", "model": "small-q4"}},
        "routes": {"chat": ["big", "small"], "code": ["small"]},
        "default": ["small"],
    }
    data.update(fields)
    return RouteTable.model_validate(data)


# -- check ------------------------------------------------------------------------------------


def test_problems_empty_for_a_consistent_table() -> None:
    assert problems(table(rules=[{"route": "code", "keywords": ["rust"]}],
                          classifier={"backend": "small", "routes": ["chat", "code"]})) == []


def test_problems_name_every_dangling_reference() -> None:
    bad = table(routes={"chat": ["big", "nope"], "code": [], "auto": ["big"]}, default=["ghost", "big", "big"],
                rules=[{"route": "poetry"}, {"route": "chat", "min_prompt_chars": 10, "max_prompt_chars": 5}],
                classifier={"backend": "tiny", "routes": ["chat", "art"]})
    assert problems(bad) == [
        "routes.auto: 'auto' is reserved for automatic selection",
        "routes.chat: 'nope' is not a backend (backends: big, small)",
        "routes.code: empty chain",
        "default: 'ghost' is not a backend (backends: big, small)",
        "default: 'big' is listed twice",
        "rules[0].route: 'poetry' is not a route (routes: auto, chat, code)",
        "rules[1]: min_prompt_chars 10 > max_prompt_chars 5",
        "classifier.backend: 'tiny' is not a backend (backends: big, small)",
        "classifier.routes: 'art' is not a route (routes: auto, chat, code)",
    ]


def test_problems_urls_and_key_files(tmp_path: Path) -> None:
    key = tmp_path / "up.key"
    key.write_text("secret\n")
    key.chmod(0o600)
    bad = table(backends={"big": {"url": "10.0.0.11:8080", "model": "m", "api_key_file": str(key)},
                          "small": {"url": "http://h:1", "model": "m", "api_key_file": str(tmp_path / "missing")}},
                api_keys_file=str(tmp_path / "clients"))
    assert problems(bad) == [
        "backends.big.url: '10.0.0.11:8080' is not an http(s) URL with a host",
        f"api_keys_file: {tmp_path / 'clients'} does not exist",
        f"backends.small.api_key_file: {tmp_path / 'missing'} does not exist",
    ]
    assert problems(bad, check_files=False) == ["backends.big.url: '10.0.0.11:8080' is not an http(s) URL with a host"]
    key.chmod(0o640)
    assert problems(bad)[2] == (f"backends.big.api_key_file: {key}: the key file is open to other users (mode 0640); "
                                f"make it private: chmod 600 {key}")


def test_rules_without_default_is_a_problem() -> None:
    assert problems(table(default=[], rules=[{"route": "code"}])) == [
        "default: empty, but rules/classifier need a default chain for requests nothing matches"]


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(data))
    return path


def test_check_command_ok(tmp_path: Path) -> None:
    path = _write(tmp_path, table().model_dump())
    result = runner.invoke(app, ["router", "check", "--routes", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{path}: ok (2 backends, 2 routes, 0 rules)"


def test_check_command_reports_cross_check_errors_with_exit_3(tmp_path: Path) -> None:
    data = table().model_dump()
    data["routes"]["chat"] = ["big", "nope"]
    data["rules"] = [{"route": "poetry"}]
    path = _write(tmp_path, data)
    result = runner.invoke(app, ["router", "check", "--routes", str(path)])
    assert result.exit_code == 3
    assert f"error: {path}: the route table does not hold together:" in result.stderr
    assert "routes.chat: 'nope' is not a backend (backends: big, small)" in result.stderr
    assert "rules[0].route: 'poetry' is not a route (routes: chat, code)" in result.stderr


def test_check_command_reports_schema_errors_with_exit_3(tmp_path: Path) -> None:
    data = table().model_dump()
    data["backends"]["big"]["max_concurency"] = 4
    path = _write(tmp_path, data)
    result = runner.invoke(app, ["router", "check", "--routes", str(path)])
    assert result.exit_code == 3
    assert "backends.big.max_concurency: Extra inputs are not permitted" in result.stderr
    missing = runner.invoke(app, ["router", "check", "--routes", str(tmp_path / "none.json")])
    assert missing.exit_code == 3
    assert "cannot read the route table" in missing.stderr


# -- selection --------------------------------------------------------------------------------


def test_selection_order() -> None:
    t = table(routes={"chat": ["big", "small"], "small": ["big"]})
    s = Selector(t)
    sel = s.explicit("chat", None)
    assert sel is not None and (sel.route, sel.chain, sel.via) == ("chat", ("big", "small"), "route")
    alias = s.explicit("big", None)
    assert alias is not None and (alias.route, alias.chain, alias.via) == ("big", ("big",), "alias")
    # a name that is both a route and a backend is the route
    both = s.explicit("small", None)
    assert both is not None and (both.chain, both.via) == (("big",), "route")
    header = s.explicit("big", "chat")
    assert header is not None and (header.route, header.via) == ("chat", "header")
    assert s.explicit("auto", None) is None
    assert s.explicit(None, None) is None
    with pytest.raises(UnknownModel) as info:
        s.explicit("gpt-4", None)
    assert str(info.value) == "model 'gpt-4' is not served here; valid: auto, big, chat, small"
    with pytest.raises(UnknownModel) as info:
        s.explicit("chat", "poetry")
    assert str(info.value) == "X-Task-Type 'poetry' is not served here; valid: chat, small"


def test_auto_without_default_or_rules_is_unknown() -> None:
    s = Selector(table(default=[]))
    with pytest.raises(UnknownModel):
        s.explicit("auto", None)


def test_rules_keywords_and_lengths() -> None:
    s = Selector(table(rules=[
        {"route": "code", "keywords": ["rust", "stack trace"]},
        {"route": "chat", "min_prompt_chars": 100},
        {"route": "code", "max_prompt_chars": 5},
    ]))

    def pick(*messages: tuple[str, Any]) -> str | None:
        sel = s.by_rules({"messages": [{"role": r, "content": c} for r, c in messages]})
        return None if sel is None else sel.route

    assert pick(("user", "Why does my Rust code panic?")) == "code"
    assert pick(("user", "here is a Stack  Trace")) is None  # "stack trace" needs the exact phrase
    assert pick(("user", "here is a stack trace please")) == "code"
    assert pick(("user", "trusty old friend, tell me a story")) is None  # words, not substrings
    assert pick(("system", "rust " * 30), ("user", "hello there, how are you doing today?")) == "chat"
    assert pick(("user", "hi")) == "code"
    assert pick(("user", [{"type": "text", "text": "rust please"}])) == "code"
    assert s.by_rules({"prompt": "fn main() in rust"}) is not None


def test_prompt_texts() -> None:
    body = {"messages": [{"role": "system", "content": "abc"}, {"role": "user", "content": "hello"},
                         {"role": "assistant", "content": "hi"}, {"role": "user", "content": "bye"}]}
    assert prompt_texts(body) == ("bye", 13)
    assert prompt_texts({"input": ["ab", "cd"]}) == ("ab\ncd", 5)
    assert prompt_texts({}) == ("", 0)


def test_parse_classifier_answer() -> None:
    routes = ["chat", "code", "code-review"]
    assert parse_classifier_answer("code", routes) == "code"
    assert parse_classifier_answer(" Code.\n", routes) == "code"
    assert parse_classifier_answer("I think code-review fits best", routes) == "code-review"
    assert parse_classifier_answer("the task type is `chat`, not code", routes) == "chat"
    assert parse_classifier_answer("poetry", routes) is None


# -- health state -----------------------------------------------------------------------------


def backend_state(name: str = "a", **health: Any) -> BackendState:
    return BackendState(name, Backend(url="http://x:1", model="m", max_concurrency=2),
                        Health(**{"failures": 3, "cooldown": 10.0, "recoveries": 2, **health}))


def test_ejection_after_consecutive_failures_only() -> None:
    s = backend_state()
    assert s.record_failure(0.0, "x") is False
    assert s.record_failure(0.0, "x") is False
    s.record_success()  # the run ends
    assert s.record_failure(0.0, "x") is False
    assert s.record_failure(0.0, "x") is False
    assert s.record_check(False, 1.0, "x") is False  # third in a row: ejected
    assert s.up is False and s.ejected_until == 11.0


def test_recovery_after_cooldown_and_consecutive_passes() -> None:
    s = backend_state()
    for _ in range(3):
        s.record_failure(0.0, "x")
    assert not s.up
    assert not s.wants_check(5.0)
    assert s.record_check(True, 5.0) is None and s.passes == 0  # still cooling down: ignored
    assert s.wants_check(10.0)
    assert s.record_check(True, 10.0) is None and s.passes == 1
    assert s.record_check(False, 11.0, "x") is None and s.passes == 0  # a failure restarts the count
    assert s.record_check(True, 12.0) is None
    s.record_success()  # a late answer does not bring it back
    assert not s.up
    assert s.record_check(True, 13.0) is True
    assert s.up and s.failures == 0


def test_a_starting_backend_is_tried_but_never_ejected_within_its_grace() -> None:
    s = BackendState("a", Backend(url="http://x:1", model="m", startup=50.0),
                     Health(failures=1, cooldown=30.0, recoveries=2))
    s.begin(100.0)
    assert (s.state, s.available, s.healthy) == ("starting", True, False)
    for t in (100.0, 120.0, 149.9):
        assert s.record_failure(t, "connect") is False
        assert s.record_check(False, t, "health connect") is None
    assert (s.state, s.failures, s.last_error) == ("starting", 0, "health connect")
    # the grace is over and it never answered: from now on an ordinary backend
    assert s.record_check(False, 150.0, "health connect") is False
    assert (s.state, s.ejected_until) == ("ejected", 180.0)


def test_a_starting_backend_is_up_at_its_first_pass_or_answer() -> None:
    checked = BackendState("a", Backend(url="http://x:1", model="m"), Health(failures=1, recoveries=5))
    checked.begin(0.0)
    checked.record_check(False, 1.0, "health HTTP 503")
    assert checked.record_check(True, 2.0) is True  # one pass: `recoveries` is for coming back
    assert (checked.state, checked.last_error) == ("up", None)
    assert checked.record_check(True, 3.0) is None
    answered = BackendState("b", Backend(url="http://x:1", model="m"), Health(failures=1))
    answered.begin(0.0)
    assert answered.record_success() is True
    assert answered.record_success() is False
    assert answered.state == "up"
    assert answered.record_failure(1.0, "connect") is True  # now its failures count


def test_the_dispatcher_takes_starting_backends_in_chain_order() -> None:
    a, b = backend_state("a"), backend_state("b")
    a.begin(0.0)
    d = Dispatcher({"a": a, "b": b}, queue_size=0, queue_timeout=1.0)
    got = d.try_acquire(("a", "b"))
    assert got is a and a.starting


def test_route_table_from_the_inventory_defaults_and_settings(tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parents[2] / "inventories" / "local-demo.yaml"
    t = route_table(load_inventory(demo))
    assert t is not None
    assert t.health == Health(interval=2.0, timeout=2.0, failures=3, cooldown=30.0, recoveries=2)
    assert t.queue == Queue(size=64, timeout=300.0)
    assert (t.backends["chat"].max_concurrency, t.backends["chat"].startup) == (2, 120.0)  # parallel 1; 120s
    text = demo.read_text(encoding="utf-8")
    health = "  health: {interval: 2s, timeout: 2s}\n"
    assert health in text
    tuned = tmp_path / "tuned.yaml"
    tuned.write_text(text.replace(health, "  health: {interval: 2s, timeout: 2s, cooldown: 5s, recoveries: 1}\n"
                                          "  queue: 8\n  queue_timeout: 2m\n"), encoding="utf-8")
    t = route_table(load_inventory(tuned))
    assert t is not None
    assert t.health == Health(interval=2.0, timeout=2.0, failures=3, cooldown=5.0, recoveries=1)
    assert t.queue == Queue(size=8, timeout=120.0)


# -- dispatcher -------------------------------------------------------------------------------


def test_dispatcher_chain_order_limits_and_queue() -> None:
    async def run() -> None:
        a, b = backend_state("a"), backend_state("b")
        d = Dispatcher({"a": a, "b": b}, queue_size=1, queue_timeout=0.2)
        chain = ("a", "b")
        got = [await d.acquire("r", chain) for _ in range(4)]
        assert [s.name for s in got] == ["a", "a", "b", "b"]  # a is full after 2, then b
        waiting = asyncio.create_task(d.acquire("r", chain))
        await asyncio.sleep(0.01)
        assert d.depth == 1 and d.depths() == {"r": 1}
        with pytest.raises(QueueFull):
            await d.acquire("r", chain)  # the queue holds one
        d.release(got[2])  # a slot of b frees: the waiter gets it
        assert (await waiting).name == "b"
        assert d.depth == 0 and d.depths() == {"r": 0}
        with pytest.raises(QueueTimeout) as info:
            await d.acquire("r", chain)
        assert info.value.reason == "every backend is busy (waited 0.2 s)"
        with pytest.raises(Exhausted):
            await d.acquire("r", chain, frozenset(chain))
        assert d.try_acquire(chain, frozenset({"a"})) is None

    asyncio.run(run())


def test_dispatcher_wakes_waiters_when_a_backend_recovers() -> None:
    async def run() -> None:
        a = backend_state("a", failures=1, cooldown=0.0, recoveries=1)
        d = Dispatcher({"a": a}, queue_size=4, queue_timeout=5.0)
        a.record_failure(0.0, "x")
        waiter = asyncio.create_task(d.acquire("r", ("a",)))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        assert a.record_check(True, 1.0) is True
        d.pump()
        assert (await waiter).name == "a" and a.in_flight == 1

    asyncio.run(run())


def test_dispatcher_without_queue_fails_at_once_when_all_down() -> None:
    async def run() -> None:
        a = backend_state("a", failures=1)
        d = Dispatcher({"a": a}, queue_size=0, queue_timeout=5.0)
        a.record_failure(0.0, "x")
        with pytest.raises(QueueFull) as info:
            await d.acquire("r", ("a",))
        assert info.value.reason == "every backend is down"

    asyncio.run(run())


# -- keys, usage ------------------------------------------------------------------------------


def test_client_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# clients\nsk-one\n\n  sk-two  \n")
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match=rf"mode 0644\); make it private: chmod 600 {path}"):
        ClientKeys.from_file(str(path))  # other users could read it
    path.chmod(0o600)
    keys = ClientKeys.from_file(str(path))
    assert len(keys) == 2
    assert keys.check_header("Bearer sk-one") and keys.check_header("bearer sk-two")
    assert not keys.check_header("Bearer sk-on") and not keys.check_header("sk-one")
    assert not keys.check_header(None) and not keys.check_header("Bearer ")
    assert ClientKeys.from_file(None).check_header(None)  # no key file: no auth
    with pytest.raises(KeyFileError):
        ClientKeys.from_file(str(tmp_path / "missing"))
    (tmp_path / "up").write_text("\nsk-upstream\n")
    (tmp_path / "up").chmod(0o400)  # as a systemd credential
    assert read_upstream_key(str(tmp_path / "up")) == "sk-upstream"


def test_find_usage() -> None:
    body = json.dumps({"choices": [{"message": {"content": 'say "usage": {"prompt_tokens": 99}'}}],
                      "usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46,
                                "prompt_tokens_details": {"cached_tokens": 0}}}).encode()
    assert find_usage(body) == (12, 34)
    sse = (b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n'
           b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\ndata: [DONE]\n\n')
    assert find_usage(sse) == (3, 5)
    assert find_usage(b'data: {"choices":[],"usage":null}\n\ndata: [DONE]\n\n') is None
    assert find_usage(b'{"data":[{"embedding":[1,2]}],"usage":{"prompt_tokens":7,"total_tokens":7}}') == (7, 0)
    assert find_usage(b'{"usage":{"prompt_tokens":7') is None
