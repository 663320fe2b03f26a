"""Fixtures for end-to-end tests on real nodes (tests/e2e/testbed.py, docs/testbed.md).

    testbed3          three booted nodes shared by the whole session
    testbed_factory   testbed_factory(n, manager=None, **kwargs): n fresh nodes for one test

Tests that use them are marked `real`. Every testbed is torn down when its scope ends, also
when a test fails or the run is interrupted; a teardown that leaves anything behind is an
error of the test that owned the testbed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.testbed import Manager, Testbed, TestbedError, TestbedFactory, open_testbed, require_systemd

TESTBED_FIXTURES = frozenset({"testbed3", "testbed_factory"})
_reports: list[str] = []
_module_seconds: dict[str, float] = {}  # setup + call + teardown of each module's tests


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TESTBED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    module = report.nodeid.split("::", 1)[0]
    if module.startswith("tests/e2e/"):
        _module_seconds[module] = _module_seconds.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _reports:
        terminalreporter.section("testbed")
        for line in _reports:
            terminalreporter.write_line(line)
    if _module_seconds:
        terminalreporter.section("e2e seconds per module (module fixtures included)")
        for module, seconds in sorted(_module_seconds.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{seconds:8.1f}  {module}")
        terminalreporter.write_line(f"{sum(_module_seconds.values()):8.1f}  all e2e")


def _opened(n: int, manager: Manager | None = None, **kwargs: Any) -> Testbed:
    testbed = open_testbed(n, manager=manager, **kwargs)
    try:
        memory = testbed.memory_bytes() / 2**20
    except TestbedError:
        memory = float("nan")
    _reports.append(f"{testbed.report()}; memory {memory:.0f} MiB ({memory / testbed.n:.0f} MiB per node)")
    return testbed


def _close(testbeds: list[Testbed]) -> None:
    problems = []
    for testbed in reversed(testbeds):
        try:
            testbed.close()
        except TestbedError as exc:
            problems.append(str(exc))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def testbed3() -> Iterator[Testbed]:
    """Three nodes (systemd, sshd, own host keys, one bridge), booted once per session."""
    testbed = _opened(3)
    try:
        yield testbed
    finally:
        _close([testbed])


@pytest.fixture(scope="module")
def systemd_nodes(testbed3: Testbed) -> None:
    """For modules whose tests need systemd on testbed3's nodes (units, journals, NRestarts):
    they skip where the nodes run without it."""
    require_systemd(testbed3)


@pytest.fixture
def testbed_factory() -> Iterator[TestbedFactory]:
    """Builds testbeds of any size for one test; all are torn down when the test ends."""
    made: list[Testbed] = []

    def make(n: int, manager: Manager | None = None, **kwargs: Any) -> Testbed:
        testbed = _opened(n, manager, **kwargs)
        made.append(testbed)
        return testbed

    try:
        yield make
    finally:
        _close(made)
