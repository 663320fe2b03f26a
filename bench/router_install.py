"""What installing the router adds to a cold deploy.

One testbed node (real systemd and sshd, reached over SSH) gets one llama-server with the real
Gemma 3 270M and the router, deployed cold (a fresh node each round) two ways in the same run:

- **command**: `router.command` runs the controller's own clusterctl (nothing installed);
- **installed**: no `router.command`: deploy builds the router's wheel, pushes it and pip-installs
  it with its dependencies into /opt/clusterctl/venv from a wheel folder (no index).

    python bench/router_install.py [--rounds N]     # needs root and tools/testbed-assets.sh's assets

It prints the median wall time of each and the difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import assets  # noqa: E402
from tests.e2e.test_deploy import _package_for_nodes  # noqa: E402
from tests.e2e.testbed import Testbed, open_testbed  # noqa: E402


def _inventory(tb: Testbed, folder: Path, installed: bool) -> Path:
    command = "" if installed else (
        f"  command: [/usr/bin/env, 'PYTHONPATH={_package_for_nodes()}', '{sys.executable}', -m, clusterctl.cli]\n")
    text = tb.cluster_yaml("bench-router", f"llama_cpp: '{assets.llama_bin_dir()}'\n{assets.router_engine()}") + \
        textwrap.dedent(f"""\
        nodes:
          node1: {{address: {tb.node("node1").ip}, ram: 4GiB}}
        models:
          gemma: {{source: 'file://{assets.test_model_path()}'}}
        services:
          chat: {{engine: llama-server, node: node1, model: gemma, port: 8080, context: 1024, threads: 1}}
        router:
          node: node1
          port: 8000
          default: [chat]
        """) + command
    path = folder / ("installed.yaml" if installed else "command.yaml")
    path.write_text(text)
    subprocess.run([sys.executable, "-m", "clusterctl.cli", "resolve", str(path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


def _cold(installed: bool, folder: Path) -> float:
    """Wall seconds of a cold deploy on a fresh node."""
    tb = open_testbed(1)
    try:
        path = _inventory(tb, folder, installed)
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "clusterctl.cli", "deploy", "-i", str(path), "--json",
                               "--phase", "acquire", "--phase", "router", "--phase", "services"],
                              capture_output=True, text=True, check=False, timeout=600)
        wall = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"deploy failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        kinds = [s["kind"] for s in json.loads(proc.stdout)["nodes"]["node1"]["steps"]]
        if ("install-engine" in kinds) != installed:
            raise SystemExit(f"unexpected steps: {kinds}")
        return wall
    finally:
        tb.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"command": [], "installed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name in ("command", "installed"):  # interleaved: the machine's noise hits both alike
                results[name].append(round(_cold(name == "installed", Path(tmp)), 1))
    cmd, inst = statistics.median(results["command"]), statistics.median(results["installed"])
    print(f"cold deploy, 1 node, llama-server + router, {args.rounds} round(s) each (median wall seconds)")
    print(f"  router.command (nothing installed): {cmd:6.1f} s   {results['command']}")
    print(f"  router installed by deploy:         {inst:6.1f} s   {results['installed']}")
    print(f"  the install adds {inst - cmd:+.1f} s ({inst / cmd:.2f}x)")


if __name__ == "__main__":
    main()
