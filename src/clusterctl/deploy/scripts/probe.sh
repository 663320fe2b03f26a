#!/usr/bin/env bash
# Every fact a deploy needs, in one round trip. Read-only. Arguments:
#   SHA256_SCRIPT MARKER BASE MANAGER UNIT_DIR UNIT_PREFIX UNIT_SUFFIX
#   FILES... -- WEIGHTS... -- DIRS... -- HANDLES... -- BINARIES... -- COMMANDS...
# SHA256_SCRIPT is the text of sha256.sh; MANAGER is systemd, launchd or direct; HANDLES are its
# units, launchd labels or control scripts. The files UNIT_DIR/UNIT_PREFIX*UNIT_SUFFIX are the
# services clusterctl installed (their names are listed; an empty UNIT_DIR lists none).
# Each section starts with a line MARKER<name>; GNU and BSD (macOS) tools both work.
sha_script=$1 marker=$2 base=$3 manager=$4 unit_dir=$5 unit_prefix=$6 unit_suffix=$7; shift 7
take() { group=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do group+=("$1"); shift; done; }
rest=("$@")
take "${rest[@]}"; files=("${group[@]}"); rest=("${rest[@]:$((${#group[@]} + 1))}")
take "${rest[@]}"; weights=("${group[@]}"); rest=("${rest[@]:$((${#group[@]} + 1))}")
take "${rest[@]}"; dirs=("${group[@]}"); rest=("${rest[@]:$((${#group[@]} + 1))}")
take "${rest[@]}"; handles=("${group[@]}"); rest=("${rest[@]:$((${#group[@]} + 1))}")
take "${rest[@]}"; binaries=("${group[@]}"); rest=("${rest[@]:$((${#group[@]} + 1))}")
commands=("${rest[@]}")

section() { echo "$marker$1"; }
# size, octal mode and path of each file that exists
stats() {
  [ $# -gt 0 ] || return 0
  if stat -c '%s %a %n' -- / >/dev/null 2>&1; then stat -c '%s %a %n' -- "$@" 2>/dev/null
  else stat -f '%z %Lp %N' -- "$@" 2>/dev/null; fi
  return 0
}

section uname; uname -sm
section memory
if [ "$(uname -s)" = Linux ]; then grep '^MemTotal:' /proc/meminfo
else echo "MemTotal: $(( $(sysctl -n hw.memsize) / 1024 )) kB"; fi
section nvidia
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits
fi
section stat; stats "${files[@]}"
section sha
present=(); for f in "${files[@]}"; do [ -f "$f" ] && present+=("$f"); done
if [ ${#present[@]} -gt 0 ]; then sh -c "$sha_script" sh "${present[@]}"; fi
section wstat
parts=(); for w in "${weights[@]}"; do parts+=("$w" "$w.part"); done
stats "${parts[@]}"
i=0
for d in "${dirs[@]}"; do
  section "df$i"; i=$((i + 1))
  while [ ! -d "$d" ]; do d=$(dirname "$d"); done
  df -Pk "$d"
done
section manager
case $manager in
  systemd) command -v systemctl || true ;;
  launchd) command -v launchctl || true ;;
  direct) echo direct ;;
esac
section states
for h in "${handles[@]}"; do
  case $manager in
    systemd) systemctl is-active -- "$h" 2>/dev/null || true ;;
    launchd)
      if launchctl print "system/$h" 2>/dev/null | grep -q 'state = running'; then echo active
      elif launchctl print "system/$h" >/dev/null 2>&1; then echo inactive; else echo unknown; fi ;;
    *) if [ -x "$h" ] && "$h" status >/dev/null 2>&1; then echo active; else echo inactive; fi ;;
  esac
done
section installed
# a glob, not ls or find: the same in every shell, GNU or BSD; no match leaves the pattern, not a file
if [ -n "$unit_dir" ] && [ -d "$unit_dir" ]; then
  for f in "$unit_dir/$unit_prefix"*"$unit_suffix"; do
    if [ -f "$f" ]; then printf '%s\n' "${f##*/}"; fi
  done
fi
section listeners
if command -v ss >/dev/null 2>&1; then
  listening=$(ss -ltnpH); printf '%s\n' "$listening"
  # the systemd unit of each listening process (its cgroup): tells an orphan holding a port from a stranger
  for pid in $(printf '%s\n' "$listening" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
    unit=$(grep -o '[^/]*\.service' "/proc/$pid/cgroup" 2>/dev/null | tail -n 1 || true)
    if [ -n "$unit" ]; then printf '#unit %s %s\n' "$pid" "$unit"; fi
  done
elif command -v lsof >/dev/null 2>&1; then echo "#lsof"; lsof -nP -iTCP -sTCP:LISTEN 2>/dev/null | tail -n +2; fi
section manifest; cat -- "$base/state/manifest.json" 2>/dev/null
section found
for f in "${binaries[@]}"; do if [ -x "$f" ]; then echo "$f"; fi; done
echo "--"
for c in "${commands[@]}"; do if command -v "$c" >/dev/null 2>&1; then echo "$c"; fi; done
section pythons
for c in "${commands[@]}"; do
  case ${c##*/} in
    python*) if command -v "$c" >/dev/null 2>&1; then
               echo "$c $("$c" -c 'import sys; print(*sys.version_info[:2])' 2>/dev/null || echo 0 0)"; fi ;;
  esac
done
true
