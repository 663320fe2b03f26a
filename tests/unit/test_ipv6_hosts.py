"""IPv6 literals wherever a host and a port are written together: in brackets ('[::1]:8080'),
through clusterctl.layout.host_port, and refused where they cannot work."""

from __future__ import annotations

import pytest

from clusterctl.layout import host_port, http_url
from clusterctl.models.remote import _redact
from clusterctl.router.config import RouteTable
from clusterctl.router.validate import problems
from clusterctl.transport.ssh import SSHTransport


@pytest.mark.parametrize(("url", "shown"), [
    ("http://[::1]:8080/m.gguf?token=x", "http://[::1]:8080/m.gguf"),
    ("https://[fe80::1]/m.gguf", "https://[fe80::1]/m.gguf"),
    ("https://user:pw@hub.example:8443/m.gguf", "https://hub.example:8443/m.gguf"),
    ("http://10.0.0.1/m.gguf", "http://10.0.0.1/m.gguf"),
])
def test_a_redacted_url_keeps_the_brackets_of_an_ipv6_host(url: str, shown: str) -> None:
    assert _redact(url) == shown


def test_host_port_and_http_url() -> None:
    assert host_port("::1", 8080) == "[::1]:8080"
    assert host_port("[::1]", 8080) == "[::1]:8080"
    assert host_port("10.0.0.1", 22) == "10.0.0.1:22"
    assert http_url("fd00::2", 8000, "/health") == "http://[fd00::2]:8000/health"


def test_ssh_transport_names_an_ipv6_node_in_brackets() -> None:
    t = SSHTransport("n1", "fd00::2", port=2222, user="root", known_hosts="/dev/null")
    assert t.where == "root@[fd00::2]:2222"


def table(listen_host: str, url: str = "http://[::1]:8080") -> RouteTable:
    return RouteTable.model_validate({"cluster": "c", "listen_host": listen_host,
                                      "backends": {"a": {"url": url, "model": "m"}}, "routes": {"chat": ["a"]}})


@pytest.mark.parametrize("host", ["::1", "::", "fd00::2", "127.0.0.1", "0.0.0.0", "localhost", "router.lan"])
def test_router_listen_host_may_be_an_address_or_a_name(host: str) -> None:
    assert problems(table(host), check_files=False) == []


@pytest.mark.parametrize(("host", "problem"), [
    ("[::1]", "listen_host: '[::1]': write an IPv6 address without brackets ('::1')"),
    ("[fd00::2]", "listen_host: '[fd00::2]': write an IPv6 address without brackets ('fd00::2')"),
    ("127.0.0.1:8000", "listen_host: '127.0.0.1:8000' is neither an IP address nor a host name (no port: that is "
     "listen_port)"),
    ("::1:8000:x", "listen_host: '::1:8000:x' is neither an IP address nor a host name (no port: that is "
     "listen_port)"),
])
def test_router_listen_host_in_brackets_or_with_a_port_is_a_problem(host: str, problem: str) -> None:
    assert problems(table(host), check_files=False) == [problem]


@pytest.mark.parametrize("url", ["http://::1:8080", "http://[::1"])
def test_router_backend_url_with_a_bare_or_broken_ipv6_literal_is_a_problem(url: str) -> None:
    (problem,) = problems(table("::1", url), check_files=False)
    assert problem.startswith(f"backends.a.url: {url!r} is not a URL (")
    assert problem.endswith("); an IPv6 address goes in brackets: http://[::1]:8080")
