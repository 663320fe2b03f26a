#!/usr/bin/env bash
# exo-test (exo) on beta: written by clusterctl, do not edit.
set -euo pipefail
export EXO_HOME=/usr/local/clusterctl/exo
export EXO_MODELS_DIR=/Users/arthurdell/models
exec /usr/local/clusterctl/engines/exo/bin/exo \
    --api-port 52416
