#!/usr/bin/env bash
# Interleaved A/B timing: runs each spec in turn, N rounds, and prints per spec the best
# wall and CPU (user + system) time and the peak RSS. On a shared, noisy host only
# interleaved best-of-N comparisons are readable; single timings are not.
#
#   benches/ab.sh N "label|ENV=val ...|BINARY|args..." ...
#
# Each run first deletes OUT (default target/ab-out; set OUT=...) and syncs, so commands
# should write there. Example (two binaries, the seed recipe under --io read):
#   benches/ab.sh 5 "old||/tmp/old-mergestream|blockmerge ... -o target/ab-out --io read" \
#                   "new||target/release/mergestream|blockmerge ... -o target/ab-out --io read"
set -euo pipefail
n=$1; shift
out=${OUT:-target/ab-out}
declare -A wall cpu rss
for spec in "$@"; do l=${spec%%|*}; wall[$l]=999999; cpu[$l]=999999; rss[$l]=0; done
t=$(mktemp)
trap 'rm -f "$t"' EXIT
for _ in $(seq "$n"); do
  for spec in "$@"; do
    IFS='|' read -r l envs bin args <<<"$spec"
    rm -rf "$out"; sync
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086  # envs and args are word lists
    env $envs /usr/bin/time -f "%M %U %S" -o "$t" "$bin" $args >/dev/null || echo "FAILED: $l" >&2
    t1=$(date +%s.%N)
    read -r r u s < "$t"
    w=$(echo "$t1 - $t0" | bc -l); c=$(echo "$u + $s" | bc -l)
    wall[$l]=$(echo "${wall[$l]} $w" | awk '{print ($1 < $2) ? $1 : $2}')
    cpu[$l]=$(echo "${cpu[$l]} $c" | awk '{print ($1 < $2) ? $1 : $2}')
    rss[$l]=$(echo "${rss[$l]} $r" | awk '{print ($1 > $2) ? $1 : $2}')
  done
done
rm -rf "$out"
for spec in "$@"; do
  l=${spec%%|*}
  printf "%-24s wall %6.2f s  cpu %6.2f s  peak RSS %5d MiB\n" "$l" "${wall[$l]}" "${cpu[$l]}" $((rss[$l] / 1024))
done
