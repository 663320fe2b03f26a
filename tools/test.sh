#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite:
#   Debian packages (compilers, cmake, nginx, wrk, nftables, docker.io: the container tests run their
#   own dockerd inside a testbed node, never the host's), the project with its test extras,
#   the real llama.cpp build and the real Gemma 3 270M model (both cached under
#   ~/.cache/clusterctl), then ruff, mypy and pytest: all tests, the `real` ones too (a plain
#   `python -m pytest` deselects those: pyproject.toml). Arguments go to pytest; a -m among
#   them replaces the one here (`tools/test.sh -m real tests/e2e`).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in cmake:cmake ninja:ninja-build g++:g++ nginx:nginx git:git curl:curl shellcheck:shellcheck \
            wrk:wrk promtool:prometheus sshd:openssh-server systemd-analyze:systemd unshare:util-linux ip:iproute2 sudo:sudo iptables:iptables nft:nftables \
            dockerd:docker.io; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if ((${#need[@]})); then
  echo "test.sh: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
eval "$(tools/testbed-assets.sh --env)"
export CLUSTERCTL_LLAMA_BIN CLUSTERCTL_TEST_MODEL CLUSTERCTL_LLAMA_SOURCE CLUSTERCTL_WHEELS \
  CLUSTERCTL_MLX_WHEELS CLUSTERCTL_TINY_MODEL CLUSTERCTL_MLX_REQUIREMENT CLUSTERCTL_VLLM_WHEELS \
  CLUSTERCTL_VLLM_REQUIREMENT CLUSTERCTL_ROUTER_WHEELS

ruff check .
mypy
python3 -m pytest -m "real or not real" "$@"
