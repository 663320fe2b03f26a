#!/usr/bin/env bash
# router (router) on local: written by clusterctl, do not edit.
set -euo pipefail
exec /opt/clusterctl/venv/bin/clusterctl-router \
    serve \
    --routes /opt/clusterctl/router/routes.json
