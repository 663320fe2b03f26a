#!/bin/sh
# sha256 of files on a node, `HASH *PATH` per line: OpenSSL where the node has it (it uses the
# CPU's SHA extensions: 3.3x coreutils' sha256sum on the test machine), else sha256sum, else
# shasum (macOS without OpenSSL).
if command -v openssl >/dev/null 2>&1; then
  for f; do openssl dgst -sha256 -r "$f" || exit 1; done
elif command -v sha256sum >/dev/null 2>&1; then
  sha256sum -b -- "$@"
else
  shasum -a 256 -b -- "$@"
fi
