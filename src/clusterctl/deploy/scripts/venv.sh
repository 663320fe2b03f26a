#!/usr/bin/env bash
# Installs a pip engine into its own venv and switches the folder the services run from (a
# symlink) to it only once pip succeeded: $1 python, $2 venv, $3 link, $4 requirement,
# $5 index URL, $6 find-links, $7 the executable it must provide, $8 packages to uninstall
# after pip (space-separated; may be empty), $9 "DISTRIBUTION NAME LOCAL": a metadata-only
# alias so the installed DISTRIBUTION also answers to NAME, at its version with the local
# label LOCAL (may be empty), $10 "MODULE:FUNCTION" the executable's console script must run
# (may be empty: a project of the same name is refused by it). The previous venv is kept
# (one back), older ones removed.
# Exit codes: 3 no venv, 4 pip failed, 5 no such executable, 6 the link is not a symlink,
# 7 the executable is another project's (its entry point is printed on stderr).
set -euo pipefail
python=$1 venv=$2 link=$3 req=$4 index=$5 links=$6 exe=$7 remove=${8:-} alias=${9:-} entry=${10:-}
name=$(basename "$venv")
if [ -e "$link" ] && [ ! -L "$link" ]; then exit 6; fi
prev=$(readlink "$link" 2>/dev/null || true)
if [ "$prev" = "$name" ] && [ -x "$venv/bin/$exe" ]; then exit 0; fi
mkdir -p "$(dirname "$venv")"
rm -rf "$venv"
if ! "$python" -m venv "$venv" >"$venv.log" 2>&1; then tail -n 20 "$venv.log" >&2; rm -rf "$venv"; exit 3; fi
args=(--disable-pip-version-check --no-input)
if [ -n "$index" ]; then args+=(--index-url "$index"); elif [ -n "$links" ]; then args+=(--no-index); fi
if [ -n "$links" ]; then args+=(--find-links "$links"); fi
if ! "$venv/bin/python" -m pip install "${args[@]}" "$req" >>"$venv.log" 2>&1; then
  tail -n 30 "$venv.log" >&2; rm -rf "$venv"; exit 4
fi
if [ -n "$remove" ]; then
  # shellcheck disable=SC2086  # a list of package names, split on purpose
  if ! "$venv/bin/python" -m pip uninstall --yes --disable-pip-version-check $remove >>"$venv.log" 2>&1; then
    tail -n 30 "$venv.log" >&2; rm -rf "$venv"; exit 4
  fi
fi
if [ -n "$alias" ]; then
  # shellcheck disable=SC2086  # "DISTRIBUTION NAME LOCAL", split on purpose
  if ! "$venv/bin/python" - $alias >>"$venv.log" 2>&1 <<'PY'
import importlib.metadata
import pathlib
import sys
import sysconfig

source, name, local = sys.argv[1:4]
version = f"{importlib.metadata.version(source)}+{local}"
info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"{name}-{version}.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                               f"Summary: {source} under the name {name}\n")
(info / "INSTALLER").write_text("clusterctl\n")
(info / "RECORD").write_text("")
PY
  then tail -n 30 "$venv.log" >&2; rm -rf "$venv"; exit 4; fi
fi
if [ ! -x "$venv/bin/$exe" ]; then rm -rf "$venv"; exit 5; fi
if [ -n "$entry" ]; then
  runs=$("$venv/bin/python" -c 'import importlib.metadata as m, sys
print(" ".join(e.value for e in m.entry_points(group="console_scripts", name=sys.argv[1])))' "$exe")
  if [ "$runs" != "$entry" ]; then echo "$exe runs ${runs:-nothing}" >&2; rm -rf "$venv"; exit 7; fi
fi
ln -sfn "$name" "$link.new"
mv -fT "$link.new" "$link"
for old in "$link"-*/; do
  old=${old%/}
  case $(basename "$old") in "$name"|"$prev") ;; *) rm -rf "$old" "$old.log";; esac
done
