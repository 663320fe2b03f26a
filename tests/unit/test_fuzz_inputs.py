"""A bounded fuzz run over the YAML loader and the inventory parser: whatever the bytes, only
typed clusterctl errors come out (never another exception) and no input takes more than a
few seconds. Derandomized, so a CI run is the same every time (about 20 s)."""

from __future__ import annotations

import copy
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterctl.errors import ClusterctlError
from clusterctl.inventory import load_inventory
from clusterctl.yamlsrc import load_yaml

SECONDS_PER_INPUT = 5
FUZZ = settings(max_examples=1000, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

BASE: dict[str, Any] = {
    "cluster": {"name": "fuzz"},
    "nodes": {"n1": {"address": "10.0.0.1", "ram": "64GiB",
                     "accelerators": [{"kind": "cuda", "count": 2, "memory": "24GiB"}]}},
    "models": {"m": {"source": "hf://org/repo@abc123/model-Q4_K_M.gguf"}},
    "services": {"chat": {"engine": "llama-server", "node": "n1", "model": "m", "port": 8080, "context": 8192}},
    "router": {"node": "n1", "port": 8000, "routes": {"chat": ["chat"]}},
}


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"an input took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def only_typed_errors(call: Callable[[], object]) -> None:
    with time_limit(SECONDS_PER_INPUT), suppress(ClusterctlError):
        call()


scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                    st.sampled_from(["1e400", "80GiB", "-1GiB", "0", "::1", "[::1]", "~", "<<", "*a", "&a", ".inf",
                                     "1EiB", "2s", "-5s", "nan", "10.0.0.1", "..", "/etc/passwd", "\x00"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
YAML_PIECES = ["a: &x [1, 2]\n", "b: *x\n", "<<: *x\n", "- - -\n", "{", "}", "[", "]", ": ", "? ",
               "!!python/object:os.system\n", "!!binary AAAA\n", "%YAML 1.1\n", "---\n", "...\n", "'", '"', "\t",
               "  ", "\n", "#", "|", ">", "&", "*",
               "\x85", "\ufeff", "\x00", "\x1b", "é", "\U0001f600"]


@FUZZ
@given(st.lists(st.one_of(st.sampled_from(YAML_PIECES), st.text(max_size=10)), max_size=40).map("".join))
def test_the_yaml_loader_raises_only_typed_errors(text: str) -> None:
    only_typed_errors(lambda: load_yaml(text, "fuzz.yaml"))


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


ALL_PATHS = paths(BASE)[1:]


@st.composite
def mutated_inventories(draw: st.DrawFn) -> str:
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(ALL_PATHS))
        parent: Any = doc
        try:
            for key in where[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent[draw(st.text(max_size=8))] = draw(values)
            else:
                parent[where[-1]] = draw(values)
        except (KeyError, IndexError, TypeError):
            continue
    text = yaml.safe_dump(doc, allow_unicode=True)
    if draw(st.booleans()):  # and a few bytes out of place
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(YAML_PIECES)) + text[at:]
    return text


def test_the_fuzzed_inventories_start_from_a_valid_one(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert list(load_inventory(path).services) == ["chat"]


@FUZZ
@given(mutated_inventories())
def test_the_inventory_parser_raises_only_typed_errors(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path: Path = tmp_path_factory.mktemp("fuzz") / "inv.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    only_typed_errors(lambda: load_inventory(path))


@FUZZ
@given(st.binary(max_size=200))
def test_the_inventory_parser_raises_only_typed_errors_on_bytes(tmp_path_factory: pytest.TempPathFactory,
                                                                data: bytes) -> None:
    path: Path = tmp_path_factory.mktemp("fuzz") / "inv.yaml"
    path.write_bytes(yaml.safe_dump(BASE).encode()[: len(data)] + data)
    only_typed_errors(lambda: load_inventory(path))
