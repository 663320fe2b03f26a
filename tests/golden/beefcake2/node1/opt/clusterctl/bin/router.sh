#!/usr/bin/env bash
# router (router) on node1: written by clusterctl, do not edit.
set -euo pipefail
exec /opt/clusterctl/venv/bin/clusterctl-router \
    serve \
    --routes /opt/clusterctl/router/routes.json
