#!/usr/bin/env bash
# Deploys the one-node local demo on this machine, offline: the real llama.cpp build and the
# real Gemma 3 270M from tools/testbed-assets.sh, the `direct` service manager (no systemd
# needed), one llama-server behind the router, then verifies it. The offline Gemma file is a base
# model, so the service frames chats as question/answer (tools/data/question-answer.jinja).
#
#   tools/local-demo.sh          deploy (again: "no changes") and verify
#   tools/local-demo.sh stop     stop the demo's processes
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/clusterctl"
DEMO="$CACHE/local-demo"
mkdir -p "$DEMO"

if [[ "${1:-}" == "stop" ]]; then
  for ctl in /opt/clusterctl/bin/chat-ctl.sh /opt/clusterctl/bin/router-ctl.sh; do
    [[ -x "$ctl" ]] && "$ctl" stop || true
  done
  exit 0
fi

eval "$(tools/testbed-assets.sh --env)"
python3 - "$DEMO/local-demo.yaml" "$CLUSTERCTL_TEST_MODEL" "$CLUSTERCTL_LLAMA_BIN" "$(command -v python3)" \
  "$PWD/tools/data/question-answer.jinja" <<'PY'
import sys
from pathlib import Path

out, model, bins, python, template = sys.argv[1:]
text = Path("inventories/local-demo.yaml").read_text()
# the offline model is a base model: it answers a question/answer framing, not Gemma's chat turns
line = next(ln for ln in text.splitlines() if ln.strip().startswith("chat_template: gemma"))
text = text.replace(line, f"    chat_template_file: '{template}'")
text = text.replace("hf://unsloth/gemma-3-270m-it-GGUF/gemma-3-270m-it-Q4_K_M.gguf", f"file://{model}")
text = text.replace("    ram: 8GiB", "    ram: 8GiB\n    manager: direct")
text = text.replace("  defaults:", f"  engines: {{llama_cpp: '{bins}'}}\n  defaults:")
text = text.replace("  health: {interval: 2s, timeout: 2s}",
                    f"  health: {{interval: 2s, timeout: 2s}}\n  command: ['{python}', -m, clusterctl.cli]")
Path(out).write_text(text)
PY
clusterctl resolve "$DEMO/local-demo.yaml"
clusterctl deploy --inventory "$DEMO/local-demo.yaml" --phase acquire --phase router --phase services
clusterctl verify --inventory "$DEMO/local-demo.yaml" || echo "verify failed: see the reasons above"
