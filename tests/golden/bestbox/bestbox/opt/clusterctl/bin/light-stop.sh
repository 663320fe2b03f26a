#!/usr/bin/env bash
# stops the container of light: written by clusterctl, do not edit.
set -euo pipefail
runtime=/usr/bin/docker
name=clusterctl-light
# gone already: it exited, and `run --rm` removed it
"$runtime" container inspect "$name" >/dev/null 2>&1 || exit 0
"$runtime" stop --time 30 "$name" >/dev/null || true
# `run --rm` removes it once it has stopped; wait for that, so that a new start can take the name
for _ in $(seq 1 100); do
  "$runtime" container inspect "$name" >/dev/null 2>&1 || exit 0
  sleep 0.1
done
exec "$runtime" rm --force "$name" >/dev/null
