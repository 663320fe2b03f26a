"""Router benchmark: direct to the upstream vs through `clusterctl router serve` vs through nginx
as a plain reverse proxy vs through LiteLLM's proxy, with the same route, the same upstream and
the same load generator (wrk).

    python bench/router_bench.py                      # the whole table + the failover run
    python bench/router_bench.py --write-docs         # ... and put the results in docs/router.md
    python bench/router_bench.py --duration 3 --concurrency 1,64 --skip-litellm
    python bench/router_bench.py --pin --scenarios sse-paced,sse-staggered --skip-litellm --skip-failover

Upstreams (127.0.0.1 only):
* `json`: nginx answering a fixed chat completion (`return 200 '{...}'`);
* `sse-burst`: nginx answering a fixed SSE stream (role chunk, 16 tokens, usage, [DONE]) at once;
* `sse-paced`: bench/router_sse.py sending the same 16 tokens 20 ms apart, like a model would
  (about 340 ms a stream), which is where the added latency of a stream is measured. Every
  stream lasts the same, so a closed loop keeps all connections in step: they start their
  next stream within a few milliseconds of each other, every time (a worst case for any proxy);
* `sse-staggered`: the same streams, each connection waiting a random 0-40 ms (wrk's
  `delay()`, not counted in the latency) before its next one, so that streams start at
  different times as they do when clients are independent.

In the two paced scenarios the client times each stream itself (see wrk(): the prompt carries
wrk's clock, the upstream echoes it in the last chunk), so that the first stream of each
connection, sent the moment wrk has opened them all, is reported apart from the rest.
`--pin` runs the proxies on the last CPU and wrk and the upstreams on the others.

Every load run is bounded in time (`--duration` seconds, wrk's own clock, and a hard timeout
around it). LiteLLM lives in its own virtual environment (created when missing, see
`ensure_litellm`). The failover run puts a two-backend chain (two nginx) behind the router,
drives steady load, SIGKILLs the first backend in the middle, and counts failed requests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "router.md"
LITELLM_VERSION = "1.108.11"
LITELLM_KEY = "sk-bench-master"
ROUTER_KEY = "sk-bench-client"
STREAM_TOKENS = 16
PACE_S = 0.02
STAGGER_MS = 40

CHAT_JSON = ('{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"m",'
             '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},'
             '"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}')


def _sse_body() -> str:
    base = '{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"m","choices":'
    events = [base + '[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}']
    events += [base + f'[{{"index":0,"delta":{{"content":"tok{i} "}},"finish_reason":null}}]}}'
               for i in range(STREAM_TOKENS)]
    events.append(base + '[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,'
                  f'"completion_tokens":{STREAM_TOKENS},"total_tokens":{5 + STREAM_TOKENS}}}}}')
    events.append("[DONE]")
    return "".join(f"data: {e}\n\n" for e in events)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clusterctl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # stray children of the group
            os.killpg(self.popen.pid, signal.SIGKILL)


PROXY_CPUS: set[int] | None = None
"""With --pin: the CPUs of the proxies (router, nginx proxy, LiteLLM); everything else runs on
the others."""


def spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None,
          proxy: bool = False) -> Proc:
    """Start a process in its own session; a proxy runs on PROXY_CPUS when they are set (its
    children inherit them)."""
    log_path = workdir / f"{name}.log"
    cpus = PROXY_CPUS if proxy else None
    with log_path.open("wb") as out:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd=ROOT, env={**os.environ, **(env or {})},
                                 preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    return Proc(name, popen, log_path)


def wait_http(proc: Proc, url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                               + proc.log_path.read_text(errors="replace")[-3000:])
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} not ready after {timeout:.0f} s:\n"
                               + proc.log_path.read_text(errors="replace")[-3000:])
        time.sleep(0.2)


def _start_nginx(workdir: Path, name: str, http: str, proxy: bool = False) -> tuple[Proc, int]:
    """One nginx (one worker, no daemon, files under workdir/name) whose http block holds
    `http`, with {port} in it replaced by the port it listens on; /health answers 200."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise SystemExit("nginx is not installed: apt-get install -y nginx")
    port = free_port()
    base = workdir / name
    base.mkdir(parents=True, exist_ok=True)
    temp = " ".join(f"{k}_temp_path {base / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = base / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    {temp}
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{http.replace("{port}", str(port))}
}}
""")
    proc = spawn(name, [binary, "-p", str(base), "-e", str(base / "error.log"), "-c", str(conf)], workdir,
                 proxy=proxy)
    wait_http(proc, f"http://127.0.0.1:{port}/health", 15)
    return proc, port


def nginx(workdir: Path, name: str) -> tuple[Proc, int]:
    """nginx answering a fixed chat completion, and a fixed SSE stream under /sse."""
    sse = _sse_body().replace("\\", "\\\\").replace("'", "\\'")
    return _start_nginx(workdir, name, f"""
    server {{
        listen 127.0.0.1:{{port}};
        location = /health {{ return 200 'ok'; }}
        location = /sse/health {{ return 200 'ok'; }}
        location = /v1/chat/completions {{ default_type application/json; return 200 '{CHAT_JSON}'; }}
        location = /sse/v1/chat/completions {{ default_type text/event-stream; return 200 '{sse}'; }}
    }}""")


def nginx_proxy(workdir: Path, upstreams: dict[str, str]) -> tuple[Proc, int]:
    """nginx as a plain reverse proxy in front of the same upstreams, a peer for the router: no
    keys, no routing by model, no metrics; `/NAME/...` goes to upstreams[NAME] + `/...`, on
    kept-alive upstream connections, responses passed on unbuffered (proxy_buffering off)."""
    servers: dict[str, str] = {}
    locations = []
    for name, url in upstreams.items():
        parts = urllib.parse.urlsplit(url)
        pool = servers.setdefault(parts.netloc, f"up{len(servers)}")
        locations.append(f"location /{name}/ {{ proxy_pass http://{pool}{parts.path}/; }}")
    pools = "\n".join(f"    upstream {pool} {{ server {netloc}; keepalive 1024; }}" for netloc, pool in servers.items())
    return _start_nginx(workdir, "nginx-proxy", f"""
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering off;
    proxy_request_buffering off;
{pools}
    server {{
        listen 127.0.0.1:{{port}};
        location = /health {{ return 200 'ok'; }}
        {" ".join(locations)}
    }}""", proxy=True)


# ---------------------------------------------------------------------------------------------
# LiteLLM in its own virtual environment


def litellm_venv() -> Path:
    return cache_dir() / "litellm-venv"


def ensure_litellm() -> Path:
    """The `litellm` executable of a venv with LiteLLM LITELLM_VERSION and its proxy requirements.

    Recipe: `pip install --no-deps litellm==VERSION`, then its requirements (base + `proxy`
    extra) as the package metadata lists them, with certifi pinned to 2026.10.18 and
    litellm-enterprise / litellm-proxy-extras unpinned, then whatever `pip check` still
    reports missing (a few rounds at most)."""
    venv = litellm_venv()
    exe = venv / "bin" / "litellm"
    marker = venv / ".clusterctl-bench-ok"
    if exe.exists() and marker.exists():
        return exe
    log(f"creating {venv} (LiteLLM {LITELLM_VERSION}) ...")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", f"litellm=={LITELLM_VERSION}", "packaging"], check=True,
                   timeout=900)
    script = (
        "import importlib.metadata as m\n"
        "from packaging.requirements import Requirement\n"
        "out = []\n"
        "for text in m.requires('litellm') or []:\n"
        "    r = Requirement(text)\n"
        "    marker = str(r.marker or '')\n"
        "    if 'extra' in marker and not r.marker.evaluate({'extra': 'proxy'}):\n"
        "        continue\n"
        "    if r.marker is not None and not r.marker.evaluate({'extra': 'proxy'}):\n"
        "        continue\n"
        "    if r.name == 'certifi':\n"
        "        out.append('certifi==2026.10.18')\n"
        "    elif r.name in ('litellm-enterprise', 'litellm-proxy-extras'):\n"
        "        out.append(r.name)\n"
        "    else:\n"
        "        out.append(r.name + str(r.specifier))\n"
        "print('\\n'.join(sorted(set(out))))\n")
    reqs = subprocess.run([str(venv / "bin" / "python"), "-c", script], check=True, capture_output=True, text=True,
                          timeout=120).stdout.split()
    subprocess.run([*pip, "install", *reqs], check=True, timeout=1800)
    for _ in range(3):
        check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=300)
        missing = sorted(set(re.findall(r"requires ([A-Za-z0-9_.\-]+), which is not installed", check.stdout)))
        if not missing:
            break
        subprocess.run([*pip, "install", *missing], check=True, timeout=1800)
    marker.write_text(LITELLM_VERSION + "\n")
    return exe


def litellm_version(exe: Path) -> str:
    out = subprocess.run([str(exe.parent / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or "?"


# ---------------------------------------------------------------------------------------------
# wrk


WRK_LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{auth}
{think}
{timed}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {{"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
  if timed_result then timed_result() end
end
"""

TIMED_LUA = """
-- Each stream timed by the client itself: the prompt carries the send time (monotonic clock,
-- microseconds) as bench-tNNN, the upstream sends tNNN back as the last content chunk. Streams sent
-- in the first {skip_ms} ms (the first one of each connection, sent as wrk opens them all at
-- once) are reported apart from the rest.
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clock, bench_timespec *ts);
]]
local ts = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end
local head, tail = {head}, {tail}
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) steady = {{}}; first = {{}}; unmatched = 0; start = now_us() end
function request() return wrk.format(nil, nil, nil, head .. string.format("bench-t%d", now_us()) .. tail) end
function response(status, headers, body)
  local t0 = tonumber(string.match(body, '"content":"t(%d+)"'))
  if t0 == nil then unmatched = unmatched + 1; return end
  if t0 - start < {skip_ms} * 1000 then table.insert(first, now_us() - t0) else table.insert(steady, now_us() - t0) end
end
local function pct(l, p)
  if #l == 0 then return -1 end
  return l[math.max(1, math.ceil(#l * p / 100))]
end
function timed_result()
  local s, f, u = {{}}, {{}}, 0
  for _, t in ipairs(threads) do
    for _, v in ipairs(t:get("steady")) do table.insert(s, v) end
    for _, v in ipairs(t:get("first")) do table.insert(f, v) end
    u = u + t:get("unmatched")
  end
  table.sort(s)
  table.sort(f)
  io.write(string.format('TIMED {{"n":%d,"p50_us":%d,"p99_us":%d,"first_n":%d,"first_p50_us":%d,' ..
    '"first_p99_us":%d,"unmatched":%d}}\\n', #s, pct(s, 50), pct(s, 99), #f, pct(f, 50), pct(f, 99), u))
end
"""
TIMED_SKIP_MS = 200
"""Streams sent this soon after wrk started are the first of their connection (every paced stream
lasts 340 ms): timed apart, as the cost of opening the connections."""


def lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk(url: str, model: str, stream: bool, key: str | None, concurrency: int, duration: float,
        workdir: Path, think_ms: int = 0, timed: bool = False) -> dict[str, float]:
    """One wrk run. With `timed` (an upstream that echoes bench-tNNN, bench/router_sse.py), p50_us and
    p99_us are the client's own timing of the streams after the first of each connection; wrk's
    figures stay as wrk_p50_us / wrk_p99_us, the first streams' as first_p50_us / first_p99_us."""
    request = {"model": model, "stream": stream, "max_tokens": 16,
               "messages": [{"role": "user", "content": "Hello, who are you?"}]}
    body = json.dumps(request)
    script = workdir / f"wrk-{abs(hash((url, model, stream, key, think_ms, timed)))}.lua"
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    think = f"delay = function() return math.random(0, {think_ms}) end" if think_ms else ""
    timed_lua = ""
    if timed:
        prompt = {**request, "messages": [{"role": "user", "content": "Hello, who are you? @"}]}
        head, tail = json.dumps(prompt).split("@")
        timed_lua = TIMED_LUA.format(head=lua_string(head), tail=lua_string(tail), skip_ms=TIMED_SKIP_MS)
    script.write_text(WRK_LUA.format(body=lua_string(body), auth=auth, think=think, timed=timed_lua))
    threads = max(1, min(2, concurrency))
    argv = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{duration:g}s", "--timeout", "10s", "-s", str(script),
            url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    m = re.search(r"^RESULT (\{.*\})$", proc.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk gave no result: {proc.stdout}\n{proc.stderr}")
    r: dict[str, float] = json.loads(m.group(1))
    seconds = r["duration_us"] / 1e6
    r["rps"] = r["requests"] / seconds if seconds else 0.0
    r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    if timed:
        t = re.search(r"^TIMED (\{.*\})$", proc.stdout, re.M)
        if not t:
            raise RuntimeError(f"wrk gave no timed result: {proc.stdout}\n{proc.stderr}")
        own = json.loads(t.group(1))
        r["wrk_p50_us"], r["wrk_p99_us"] = r["p50_us"], r["p99_us"]
        r["timed_n"], r["first_n"] = own["n"], own["first_n"]
        # a proxy too slow to finish a stream after its first one in the run keeps wrk's figures
        if own["n"] > 0:
            r["p50_us"], r["p99_us"] = own["p50_us"], own["p99_us"]
        first = own["first_n"] > 0
        r["first_p50_us"] = own["first_p50_us"] if first else None
        r["first_p99_us"] = own["first_p99_us"] if first else None
        r["untimed"] = own["unmatched"]
    return r


# ---------------------------------------------------------------------------------------------
# the benchmark


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    model: str
    key: str | None


@dataclass(frozen=True)
class Scenario:
    name: str
    stream: bool
    path: str  # the upstream's base path (nginx serves the SSE body under /sse)
    think_ms: int = 0  # each connection waits a random 0..think_ms before its next request
    timed: bool = False  # streams timed by the client itself (the upstream echoes bench-tNNN), see wrk()


def router_table(workdir: Path, backends: dict[str, str], routes: dict[str, list[str]], port: int,
                 health: dict[str, Any] | None = None) -> Path:
    keys = workdir / "router-clients.keys"
    keys.write_text(ROUTER_KEY + "\n")
    keys.chmod(0o600)
    table = {
        "cluster": "bench", "listen_host": "127.0.0.1", "listen_port": port, "api_keys_file": str(keys),
        "backends": {name: {"url": url, "model": "m", "max_concurrency": 1024} for name, url in backends.items()},
        "routes": routes, "queue": {"size": 1024, "timeout": 30.0},
        "health": health or {"interval": 5.0},
    }
    path = workdir / f"routes-{port}.json"
    path.write_text(json.dumps(table, indent=2, sort_keys=True))
    return path


def start_router(workdir: Path, table: Path, port: int, name: str = "router") -> Proc:
    proc = spawn(name, [sys.executable, "-m", "clusterctl.cli", "router", "serve", "--routes", str(table)], workdir,
                 env={"PYTHONPATH": str(ROOT / "src")}, proxy=True)
    wait_http(proc, f"http://127.0.0.1:{port}/health", 30)
    return proc


def start_litellm(exe: Path, workdir: Path, bases: dict[str, str], workers: int) -> tuple[Proc, int]:
    port = free_port()
    lines = ["model_list:"]
    for model, base in bases.items():
        lines += [f"  - model_name: {model}", "    litellm_params:", "      model: openai/m",
                  f"      api_base: {base}", "      api_key: unused"]
    lines += ["general_settings:", f"  master_key: {LITELLM_KEY}"]
    config = workdir / "litellm.yaml"
    config.write_text("\n".join(lines) + "\n")
    proc = spawn("litellm", [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                             "--num_workers", str(workers)], workdir,
                 env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}, proxy=True)
    wait_http(proc, f"http://127.0.0.1:{port}/health/liveliness", 180)
    return proc, port


def machine_facts() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    wrk_v = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    nginx_v = subprocess.run([shutil.which("nginx") or "/usr/sbin/nginx", "-v"], capture_output=True,
                             text=True).stderr.strip()
    import aiohttp

    return {"cpus": str(os.cpu_count()), "cpu": cpu, "memory": mem, "os": platform.platform(),
            "python": platform.python_version(), "aiohttp": aiohttp.__version__,
            "wrk": " ".join(wrk_v.split()[:2]), "nginx": nginx_v.replace("nginx version: ", "")}


def ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def run_bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    scenarios = [Scenario("json", False, ""), Scenario("sse-burst", True, "/sse"),
                 Scenario("sse-paced", True, "", timed=True),
                 Scenario("sse-staggered", True, "", think_ms=STAGGER_MS, timed=True)]
    scenarios = [s for s in scenarios if s.name in args.scenarios.split(",")]
    procs: list[Proc] = []
    results: dict[str, Any] = {"facts": machine_facts(), "rows": [], "failover": None, "pinned": args.pin,
                               "load_generator": "wrk", "duration_s": args.duration, "repeat": args.repeat}
    try:
        ngx, ngx_port = nginx(workdir, "nginx")
        procs.append(ngx)
        sse_port = free_port()
        sse = spawn("sse", [sys.executable, str(ROOT / "bench" / "router_sse.py"), "--port", str(sse_port),
                            "--chunks", str(STREAM_TOKENS), "--interval", str(PACE_S)], workdir)
        procs.append(sse)
        wait_http(sse, f"http://127.0.0.1:{sse_port}/health", 15)
        upstream = {"json": f"http://127.0.0.1:{ngx_port}", "sse-burst": f"http://127.0.0.1:{ngx_port}/sse",
                    "sse-paced": f"http://127.0.0.1:{sse_port}"}
        upstream["sse-staggered"] = upstream["sse-paced"]
        router_port = free_port()
        # one route per scenario, named after it, with one backend
        table = router_table(workdir, {"json": upstream["json"], "sseburst": upstream["sse-burst"],
                                       "ssepaced": upstream["sse-paced"]},
                             {"json": ["json"], "sse-burst": ["sseburst"], "sse-paced": ["ssepaced"],
                              "sse-staggered": ["ssepaced"]}, router_port)
        router = start_router(workdir, table, router_port)
        procs.append(router)
        proxy, proxy_port = nginx_proxy(workdir, {s.name: upstream[s.name] for s in scenarios})
        procs.append(proxy)
        targets_for: dict[str, list[Target]] = {}
        litellm_port = None
        if not args.skip_litellm:
            exe = ensure_litellm()
            results["facts"]["litellm"] = f"{litellm_version(exe)} ({args.litellm_workers} workers)"
            lite, litellm_port = start_litellm(exe, workdir, {s.name: upstream[s.name] + "/v1" for s in scenarios},
                                               args.litellm_workers)
            procs.append(lite)
        for s in scenarios:
            targets = [Target("direct", f"{upstream[s.name]}/v1/chat/completions", "m", None),
                       Target("router", f"http://127.0.0.1:{router_port}/v1/chat/completions", s.name, ROUTER_KEY),
                       Target("nginx", f"http://127.0.0.1:{proxy_port}/{s.name}/v1/chat/completions", "m", None)]
            if litellm_port is not None:
                targets.append(Target("litellm", f"http://127.0.0.1:{litellm_port}/v1/chat/completions", s.name,
                                      LITELLM_KEY))
            targets_for[s.name] = targets
        for s in scenarios:
            for c in concurrencies:
                row: dict[str, Any] = {"scenario": s.name, "concurrency": c}
                runs: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets_for[s.name]}
                for _ in range(args.repeat):  # interleaved, so that a noisy moment hits every target alike
                    for t in targets_for[s.name]:
                        # a short warm-up (connections, caches), then the measured run
                        wrk(t.url, t.model, s.stream, t.key, c, 1, workdir, s.think_ms, s.timed)
                        runs[t.name].append(wrk(t.url, t.model, s.stream, t.key, c, args.duration, workdir,
                                                s.think_ms, s.timed))
                for t in targets_for[s.name]:
                    r = _median_run(runs[t.name])
                    row[t.name] = r
                    first = (f"  first streams p50 {ms(r['first_p50_us'])} p99 {ms(r['first_p99_us'])} ms"
                             if s.timed and r["first_p50_us"] is not None else "")
                    log(f"{s.name:9} c={c:<3} {t.name:7} {r['rps']:9.0f} req/s  p50 {ms(r['p50_us'])} ms  "
                        f"p99 {ms(r['p99_us'])} ms  errors {r['errors']:.0f}/{r['requests']:.0f}{first}")
                results["rows"].append(row)
        for p in reversed(procs):
            p.stop()
        procs.clear()
        if not args.skip_failover:
            results["failover"] = failover(workdir, args.failover_duration)
    finally:
        for p in reversed(procs):
            p.stop()
    return results


def _median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over repeated runs (errors and requests are summed; runs without
    the figure are left out)."""
    out = dict(runs[0])
    for key in runs[0]:
        values = sorted(r[key] for r in runs if r.get(key) is not None)
        if not values:
            out[key] = None
        else:
            out[key] = sum(values) if key in ("requests", "errors", "untimed") else values[len(values) // 2]
    return out


def failover(workdir: Path, duration: float) -> dict[str, Any]:
    """Steady load (wrk, 32 connections) through a chain of two nginx backends; the first is
    SIGKILLed at a third of the run."""
    first, first_port = nginx(workdir, "nginx-first")
    second, second_port = nginx(workdir, "nginx-second")
    port = free_port()
    table = router_table(workdir, {"first": f"http://127.0.0.1:{first_port}",
                                   "second": f"http://127.0.0.1:{second_port}"}, {"chat": ["first", "second"]}, port,
                         health={"interval": 1.0, "timeout": 1.0, "failures": 3, "cooldown": 10.0})
    router = start_router(workdir, table, port, "router-failover")
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        wrk(url, "chat", False, ROUTER_KEY, 32, 1, workdir)
        before = _get(f"http://127.0.0.1:{port}/metrics", ROUTER_KEY)
        args = (url, "chat", False, ROUTER_KEY, 32, duration, workdir)
        with _background(lambda: (time.sleep(duration / 3), first.stop(signal.SIGKILL))):
            r = wrk(*args)
        metrics = _get(f"http://127.0.0.1:{port}/metrics", ROUTER_KEY)
        served = {b: _metric(metrics, "clusterctl_router_requests_total", backend=b, status="200")
                  - _metric(before, "clusterctl_router_requests_total", backend=b, status="200")
                  for b in ("first", "second")}
        failures = {reason: _metric(metrics, "clusterctl_router_upstream_failures_total", backend="first",
                                    reason=reason) for reason in ("connect", "disconnected", "timeout", "error")}
        failures["ejected"] = _metric(metrics, "clusterctl_router_backend_ejections_total", backend="first")
        ok = r["requests"] - r["errors"]
        result = {"requests": r["requests"], "failed": r["errors"], "success_pct": 100.0 * ok / r["requests"],
                  "rps": r["rps"], "served_by": served, "first_backend_failures": failures,
                  "duration_s": duration, "connections": 32}
        log(f"failover: {ok:.0f}/{r['requests']:.0f} succeeded ({result['success_pct']:.3f} %), served by {served}")
        return result
    finally:
        for p in (router, first, second):
            p.stop()


@contextlib.contextmanager
def _background(fn: Any) -> Iterator[None]:
    import threading

    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(60)


def _get(url: str, key: str) -> str:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.read().decode())


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labelset = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}")]))
        if all(labelset.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------------------------------------
# report


PROXIES = (("router", "router"), ("nginx", "nginx"), ("litellm", "LiteLLM"))


def _added(proxy: dict[str, Any], direct: dict[str, Any], p50: str = "p50_us", p99: str = "p99_us") -> str:
    if proxy.get(p50) is None or direct.get(p50) is None:
        return "-"
    untimed = " (wrk)" if p50 == "p50_us" and proxy.get("timed_n") == 0 else ""
    return f"{ms(proxy[p50] - direct[p50])} / {ms(proxy[p99] - direct[p99])}{untimed}"


def table_markdown(results: dict[str, Any]) -> str:
    rows = results["rows"]
    proxies = [(key, label) for key, label in PROXIES if any(key in row for row in rows)]
    head = ["scenario", "conc.", "direct req/s", "direct p50 / p99 ms"]
    for _, label in proxies:
        head += [f"{label} req/s", f"{label} added p50 / p99 ms"]
    if any(key == "litellm" for key, _ in proxies):
        head.append("router / LiteLLM req/s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        d = row["direct"]
        cells = [row["scenario"], str(row["concurrency"]), f"{d['rps']:.0f}", f"{ms(d['p50_us'])} / {ms(d['p99_us'])}"]
        for key, _ in proxies:
            cells += [f"{row[key]['rps']:.0f}", _added(row[key], d)] if key in row else ["-", "-"]
        if "litellm" in row:
            lite = row["litellm"]
            cells.append(f"{row['router']['rps'] / lite['rps']:.1f}x" if lite["rps"] else "-")
        errors = sum(row[t]["errors"] for t in ("direct", *(k for k, _ in proxies)) if t in row)
        if errors:
            cells[1] += f" ({errors:.0f} err)"
        lines.append("| " + " | ".join(cells) + " |")
    summary = []
    for name in dict.fromkeys(row["scenario"] for row in rows):
        mine = [row for row in rows if row["scenario"] == name]
        best = {key: max(row[key]["rps"] for row in mine) for key, _ in proxies}
        text = f"* `{name}`: router max {best['router']:.0f} req/s"
        if best.get("nginx"):
            text += f", nginx {best['nginx']:.0f} req/s (router {best['router'] / best['nginx']:.2f}x nginx)"
        if best.get("litellm"):
            text += f", LiteLLM {best['litellm']:.0f} req/s (router {best['router'] / best['litellm']:.1f}x LiteLLM)"
        summary.append(text)
    out = "\n".join(lines) + "\n\nMaximum throughput over the concurrencies:\n\n" + "\n".join(summary) + "\n"
    timed = [row for row in rows if row["direct"].get("first_p50_us") is not None]
    if timed:
        head = ["scenario", "conc.", "direct p50 / p99 ms"] + [f"{label} added p50 / p99 ms" for _, label in proxies]
        first = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in timed:
            d = row["direct"]
            cells = [row["scenario"], str(row["concurrency"]), f"{ms(d['first_p50_us'])} / {ms(d['first_p99_us'])}"]
            cells += [_added(row[key], d, "first_p50_us", "first_p99_us") if key in row else "-" for key, _ in proxies]
            first.append("| " + " | ".join(cells) + " |")
        out += ("\nThe first stream of each connection (sent the moment wrk has opened all of them, so the "
                "proxy accepts the connections, opens its upstream connections and takes every first request "
                "in the same few milliseconds), timed apart from the table above:\n\n" + "\n".join(first) + "\n")
    return out


def facts_markdown(results: dict[str, Any], command: str) -> str:
    f = results["facts"]
    lines = [f"* machine: {f['cpus']} CPU cores ({f['cpu']}), {f['memory']} RAM, {f['os']}",
             f"* software: Python {f['python']}, aiohttp {f['aiohttp']}, {f['nginx']}, {f['wrk']}"
             + (f", LiteLLM {f['litellm']}" if "litellm" in f else ""),
             f"* load generator: wrk, {results['duration_s']:g} s per measurement after a 1 s warm-up"
             + (f", median of {results['repeat']} interleaved runs" if results.get("repeat", 1) > 1 else "")
             + "; latency = whole response (the last byte of a stream). `json` and `sse-burst`: wrk's own "
             "latency figures. `sse-paced` and `sse-staggered`: each stream timed by the client (the prompt "
             "carries wrk's clock, the upstream sends it back in the last chunk), the first stream of each "
             "connection left out and shown in the second table; a `(wrk)` mark: no later stream finished within "
             "the run, wrk's figures",
             "* the proxies, the upstreams and wrk all run on the same machine"
             + (f" (pinned: the proxies on CPU {','.join(map(str, sorted(PROXY_CPUS or ())))}, wrk and the upstreams "
                "on the others)" if results.get("pinned") else ", on all its CPUs")
             + "; the router logs every request (access log to a file), checks client keys and counts metrics; "
             "nginx is a plain reverse proxy (no keys, no routing by model, no metrics, kept-alive upstream "
             "connections, `proxy_buffering off`)",
             f"* command: `{command}`"]
    return "\n".join(lines) + "\n"


def failover_markdown(results: dict[str, Any]) -> str:
    fo = results.get("failover")
    if not fo:
        return "(not run)\n"
    return (f"Steady load ({fo['connections']} connections, {fo['duration_s']:g} s, wrk) through the chain "
            f"`[first, second]` (two nginx); the first backend is SIGKILLed a third into the run. "
            f"**{fo['requests'] - fo['failed']:.0f} of {fo['requests']:.0f} requests succeeded: "
            f"{fo['success_pct']:.3f} %** ({fo['rps']:.0f} req/s overall; served by first "
            f"{fo['served_by']['first']:.0f}, by second {fo['served_by']['second']:.0f}; failed attempts on the "
            f"first backend, each retried on the second: "
            + ", ".join(f"{k} {v:.0f}" for k, v in fo["first_backend_failures"].items() if v and k != "ejected")
            + f"; the first backend was ejected {fo['first_backend_failures'].get('ejected', 0):.0f} time(s)).\n")


def write_docs(results: dict[str, Any], command: str) -> None:
    """Into the bench block of docs/router.md (the bench-pinned block for a --pin run)."""
    text = DOC.read_text()
    mark = "bench-pinned" if results.get("pinned") else "bench"
    block = f"<!-- {mark}:start -->\n" + facts_markdown(results, command) + "\n" + table_markdown(results)
    if results.get("failover"):
        block += "\n### Failover\n\n" + failover_markdown(results)
    block += f"<!-- {mark}:end -->"
    new, n = re.subn(f"<!-- {mark}:start -->.*?<!-- {mark}:end -->", lambda _: block, text, flags=re.S)
    if n != 1:
        raise SystemExit(f"{DOC} has no <!-- {mark}:start --> ... <!-- {mark}:end --> block")
    DOC.write_text(new)
    log(f"wrote the results into {DOC}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the table shows medians")
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--scenarios", default="json,sse-burst,sse-paced,sse-staggered")
    parser.add_argument("--litellm-workers", type=int, default=2)
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--skip-failover", action="store_true")
    parser.add_argument("--failover-duration", type=float, default=15.0)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--write-docs", action="store_true", help="put the results into docs/router.md")
    parser.add_argument("--workdir", type=Path, help="keep configs and logs here (default: a temporary directory)")
    parser.add_argument("--pin", action="store_true",
                        help="run the proxies on the last CPU and wrk and the upstreams on the others, as a router "
                             "with a machine of its own would run")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    command = "python bench/router_bench.py " + " ".join(sys.argv[1:])
    if args.pin:
        global PROXY_CPUS
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        PROXY_CPUS = {cpus[-1]}
        os.sched_setaffinity(0, set(cpus[:-1]))  # this process, wrk and the upstreams
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = run_bench(args, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
            results = run_bench(args, Path(tmp))
    print(facts_markdown(results, command.strip()))
    print(table_markdown(results))
    print(failover_markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.write_docs:
        write_docs(results, command.strip())


if __name__ == "__main__":
    main()
