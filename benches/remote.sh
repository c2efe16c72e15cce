#!/usr/bin/env bash
# Remote-input benchmark: the seed recipe (gradient blockmerge) on synthetic checkpoints with
# real Llama shapes, read from local disk and over HTTP from a local nginx (range requests,
# as from a Hub's storage host), against the time to fetch the inputs' bytes with curl, in
# the same run. Reports wall time, peak RSS, and bytes fetched (nginx's own count) against
# the bytes the merge needs; and what a header-only `inspect` of a remote model fetches.
#
#   benches/remote.sh [--preset llama2-13b] [--layers 2] [--dir DIR] [--port 8766] [--repeat 3]
#
# Needs nginx (Debian: `apt-get install nginx-light`) and ~2.2x one model of free disk.
set -euo pipefail
cd "$(dirname "$0")/.."

preset=llama2-13b
layers=2
dir=target/remote-bench
port=8766
repeat=3
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v nginx >/dev/null || { echo "needs nginx: apt-get install nginx-light" >&2; exit 2; }

cargo build --release --quiet --example synth
cargo build --release --quiet
bin=$PWD/target/release/mergestream
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf="$dir/nginx.conf"
cleanup() {
  [ -f "$dir/nginx.pid" ] && nginx -c "$conf" -s stop 2>/dev/null || true
  rm -rf "$dir/a" "$dir/b" "$dir/out"
}
trap cleanup EXIT

target/release/examples/synth model --preset "$preset" --layers "$layers" --seed 1 --out "$dir/a" >/dev/null
target/release/examples/synth model --preset "$preset" --layers "$layers" --seed 2 --out "$dir/b" >/dev/null
cat > "$conf" <<CONF
worker_processes 2;
error_log $dir/error.log;
pid $dir/nginx.pid;
events { worker_connections 256; }
http {
  log_format bytes '\$bytes_sent';
  access_log $dir/access.log bytes;
  sendfile on;
  server { listen 127.0.0.1:$port; root $dir; }
}
CONF
nginx -c "$conf"
url="http://127.0.0.1:$port"
needed=$(cat "$dir"/a/*.safetensors "$dir"/b/*.safetensors | wc -c)
cat "$dir"/a/* "$dir"/b/* > /dev/null

now() { date +%s.%N; }
min() { echo "$1 $2" | awk '{print ($1 < $2) ? $1 : $2}'; }
served() { awk '{s += $1} END {printf "%.0f", s}' "$dir/access.log"; }

floor=999999
for _ in $(seq "$repeat"); do
  t0=$(now)
  for f in "$dir"/a/*.safetensors "$dir"/b/*.safetensors; do
    curl -s "$url/${f#"$dir"/}" -o /dev/null
  done
  floor=$(min "$floor" "$(echo "$(now) - $t0" | bc -l)")
done

gradient="[0.9,0.72,0.54,0.36,0.18,0.0,0.0,0.0,0.0]"
run() {
  local label=$1 m1=$2 m2=$3 wall=999999 rss=0 fetched=0
  for _ in $(seq "$repeat"); do
    rm -rf "$dir/out"
    sync
    : > "$dir/access.log"
    nginx -c "$conf" -s reopen 2>/dev/null
    local t0
    t0=$(now)
    /usr/bin/time -f "%M" -o "$dir/rss" "$bin" blockmerge --model_path1 "$m1" --model_path2 "$m2" \
      --gradient_values "$gradient" --layer_only -o "$dir/out" --quiet
    wall=$(min "$wall" "$(echo "$(now) - $t0" | bc -l)")
    rss=$(echo "$rss $(cat "$dir/rss")" | awk '{print ($1 > $2) ? $1 : $2}')
    sleep 0.2
    fetched=$(served)
  done
  printf "| %-30s | %7.2f s | %5.2fx | %6.0f MiB | %8.1f MiB |\n" "$label" "$wall" \
    "$(echo "$wall / $floor" | bc -l)" "$(echo "$rss / 1024" | bc -l)" "$(echo "$fetched / 1048576" | bc -l)"
}

echo
echo "preset $preset, $layers layers, best of $repeat, $(echo "$needed / 1073741824" | bc -l | cut -c1-5) GiB of inputs, $(nproc) cores"
echo
echo "| run                            | wall      | × floor | peak RSS   | fetched      |"
echo "|--------------------------------|-----------|-------|------------|--------------|"
printf "| %-30s | %7.2f s | %5.2fx | %10s | %8.1f MiB |\n" "curl all input bytes (floor)" "$floor" 1 "-" "$(echo "$needed / 1048576" | bc -l)"
run "seed recipe, local disk" "$dir/a" "$dir/b"
run "seed recipe, over HTTP" "$url/a/" "$url/b/"
: > "$dir/access.log"
nginx -c "$conf" -s reopen 2>/dev/null
"$bin" inspect "$url/a/" > /dev/null
sleep 0.2
echo
echo "header-only inspect of $url/a/: fetched $(served) bytes"
