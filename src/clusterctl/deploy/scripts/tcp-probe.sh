#!/usr/bin/env bash
# Exits 0 when $1:$2 accepts a TCP connection (bash's /dev/tcp: no extra tool on the node).
exec 3<>"/dev/tcp/$1/$2"
