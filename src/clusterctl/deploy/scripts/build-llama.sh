#!/usr/bin/env bash
# Builds llama.cpp on the node: $1 archive, $2 work folder (kept: extracted source and build
# tree, so a later build with more targets is incremental), $3 subdir ("" = find it), $4 jobs
# ("" = all cores), $5 bin folder, then the binaries to install, "--", the cmake flags.
# Each binary is installed atomically (temp file + rename) and printed as INSTALLED name sha size.
# Exit codes: 3 no source tree, 4 configure failed, 5 no such target, 6 build failed.
set -euo pipefail
archive=$1 work=$2 subdir=$3 jobs=$4 bin=$5; shift 5
names=(); while [ "$1" != "--" ]; do names+=("$1"); shift; done; shift
[ -n "$jobs" ] || jobs=$(nproc 2>/dev/null || sysctl -n hw.ncpu)
mkdir -p "$work" "$bin"
if [ ! -f "$work/.extracted" ]; then
  rm -rf "$work/src"; mkdir "$work/src"
  tar -xf "$archive" -C "$work/src" --no-same-owner
  touch "$work/.extracted"
fi
src=""
if [ -n "$subdir" ]; then
  tops=("$work"/src/*/)
  if [ ${#tops[@]} = 1 ] && [ -d "${tops[0]}$subdir" ]; then src=${tops[0]}$subdir; else src=$work/src/$subdir; fi
else
  found=$(find "$work/src" -maxdepth 6 -path '*/ggml/CMakeLists.txt' -printf '%d %h\n' | sort -n | head -n 1)
  [ -z "$found" ] || src=${found#* }; src=${src%/ggml}
fi
if [ -z "$src" ] || [ ! -f "$src/CMakeLists.txt" ]; then
  echo "no llama.cpp source tree (a CMakeLists.txt next to ggml/) in $archive" >&2; exit 3
fi
gen=(); if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi
if [ ! -f "$work/build/CMakeCache.txt" ]; then
  rm -rf "$work/build"
  if ! cmake -S "$src" -B "$work/build" "${gen[@]}" "$@" >"$work/configure.log" 2>&1; then
    tail -n 30 "$work/configure.log" >&2; rm -rf "$work/build"; exit 4
  fi
fi
help=$(cmake --build "$work/build" --target help 2>/dev/null || true)
targets=()
for n in "${names[@]}"; do
  case $n in rpc-server) cands="ggml-rpc-server rpc-server";; *) cands=$n;; esac
  t=""
  for c in $cands; do if grep -Eq "(^|[ .])$c(:|\s|$)" <<<"$help"; then t=$c; break; fi; done
  if [ -z "$t" ]; then echo "this llama.cpp source has no target $cands" >&2; exit 5; fi
  targets+=("$t")
done
if ! cmake --build "$work/build" -j "$jobs" --target "${targets[@]}" >"$work/build.log" 2>&1; then
  tail -n 40 "$work/build.log" >&2; exit 6
fi
for i in "${!names[@]}"; do
  f=$(find "$work/build" -type f -name "${targets[$i]}" -perm -u+x | head -n 1)
  install -m 0755 "$f" "$bin/.${names[$i]}.part"
  mv -f "$bin/.${names[$i]}.part" "$bin/${names[$i]}"
  echo "INSTALLED ${names[$i]} $(sha256sum <"$bin/${names[$i]}" | cut -d' ' -f1) $(stat -c %s "$bin/${names[$i]}")"
done
