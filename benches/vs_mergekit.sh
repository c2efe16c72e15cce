#!/usr/bin/env bash
# mergestream against mergekit on the same configs and checkpoints: wall time and peak RSS.
#
#   benches/vs_mergekit.sh [--dir target/e2e] [--mergekit PATH/TO/mergekit-yaml]
#
# Uses the checkpoints benches/e2e.sh generates (run it with --keep first). mergekit is
# optional: `pip install mergekit` (it brings torch); without it only mergestream runs.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=target/e2e
mk=$(command -v mergekit-yaml || true)
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --mergekit) mk=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -d "$dir/a" ] && [ -d "$dir/b" ] || { echo "run benches/e2e.sh --keep first" >&2; exit 2; }
cargo build --release --quiet
bin=target/release/mergestream
a=$(realpath "$dir/a"); b=$(realpath "$dir/b")

cat > "$dir/linear.yml" <<YAML
merge_method: linear
models:
  - model: $a
    parameters: {weight: 0.6}
  - model: $b
    parameters: {weight: 0.4}
dtype: float16
YAML
cat > "$dir/ties.yml" <<YAML
merge_method: ties
base_model: $a
models:
  - model: $b
    parameters: {weight: 1.0, density: 0.5}
parameters: {normalize: true}
dtype: float16
YAML

cat "$a"/*.safetensors "$b"/*.safetensors > /dev/null
measure() {
  local label=$1; shift
  rm -rf "$dir/out"; sync
  /usr/bin/time -f "%e %M" -o "$dir/time" "$@" > /dev/null 2>&1 || { echo "| $label | failed |"; return; }
  read -r wall rss < "$dir/time"
  printf "| %-34s | %7.1f s | %6.2f GiB |\n" "$label" "$wall" "$(echo "$rss / 1048576" | bc -l)"
}
echo "| run                                | wall      | peak RSS   |"
echo "|------------------------------------|-----------|------------|"
for cfg in linear ties; do
  measure "mergestream merge $cfg" "$bin" merge "$dir/$cfg.yml" "$dir/out" --quiet
  if [ -n "$mk" ]; then
    measure "mergekit-yaml $cfg" "$mk" "$dir/$cfg.yml" "$dir/out" --no-write-model-card --no-copy-tokenizer
  fi
done
rm -rf "$dir/out" "$dir/time" "$dir/linear.yml" "$dir/ties.yml"
