#!/usr/bin/env bash
# Removes the firewall rule clusterctl applied for a service it no longer runs (deploy --prune):
# the nftables table, or the iptables/ip6tables chain and the INPUT jump to it. Absent rules are
# fine (a service that never had one, a rule already gone).
# args: TABLE CHAIN
set -uo pipefail
table=$1 chain=$2
if command -v nft >/dev/null 2>&1 && nft list table inet "$table" >/dev/null 2>&1; then
  nft delete table inet "$table" || exit 1
fi
for ipt in iptables ip6tables; do
  command -v "$ipt" >/dev/null 2>&1 || continue
  "$ipt" -w -nL "$chain" >/dev/null 2>&1 || continue
  while "$ipt" -w -D INPUT -p tcp -j "$chain" 2>/dev/null; do :; done
  "$ipt" -w -F "$chain" && "$ipt" -w -X "$chain" || exit 1
done
exit 0
