#!/usr/bin/env bash
# End-to-end benchmark: the seed recipe (gradient blockmerge, with and without a LoRA on
# model2) on synthetic checkpoints with real Llama shapes, against the I/O floor measured
# in the same run. Reports wall time, ratio to the floor and peak RSS, then deletes what it
# generated.
#
#   benches/e2e.sh [--preset llama2-13b] [--layers 8] [--rank 64] [--dir DIR] [--io auto]
#                  [--all] [--keep] [--extra "ARGS for mergestream"] [--compare OLD_BINARY]
#                  [--merge "linear ties"] [--repeat 3] [--budgets "default 256MiB"]
#                  [--ios "auto read"] [--writes "buffered"] [--every-method]
#
# --all blends every tensor (embeddings and lm_head included) instead of --layer_only.
# --merge "linear ties ..." adds `mergestream merge` rows: those mergekit methods with model a
#   as the base and b as the fine-tune (density 0.5 where the method reads one).
# --budgets, --ios and --writes repeat each row with those --memory-limit, --io and --write
#   values (`default`, the --io given and `auto` keep the plain row).
# --every-method: every row issue 13 targets — linear, slerp, nuslerp, ties, dare_ties,
#   breadcrumbs_ties, della and model_stock (3 inputs: a third model is made), each at the
#   default budget and 256MiB, and with --io read (the seed recipe rows too).
# --compare runs every row with a second binary too (interleaved, same page cache, best of
# the same number of runs) and adds its wall and CPU time and the new/old ratios: a
# before/after check (CPU time is the steadier one on a shared machine).
#
# Needs ~3.3x one model of free disk in DIR (default: target/e2e).
set -euo pipefail
cd "$(dirname "$0")/.."

preset=llama2-13b
layers=8
rank=64
dir=target/e2e
io=auto
keep=0
extra=""
old_bin=""
methods=""
repeat=3
budgets=default
ios=""
writes=""
filter=--layer_only
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --rank) rank=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --io) io=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --all) filter=""; shift ;;
    --extra) extra=$2; shift 2 ;;
    --compare) old_bin=$2; shift 2 ;;
    --merge) methods=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --budgets) budgets=$2; shift 2 ;;
    --ios) ios=$2; shift 2 ;;
    --writes) writes=$2; shift 2 ;;
    --every-method)
      methods="linear slerp nuslerp ties dare_ties breadcrumbs_ties della model_stock"
      budgets="default 256MiB"; ios="read"; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

cargo build --release --quiet --example synth
cargo build --release --quiet
bin=target/release/mergestream
synth=target/release/examples/synth
mkdir -p "$dir"
cleanup() { if [ "$keep" = 0 ]; then rm -rf "$dir/a" "$dir/b" "$dir/c" "$dir/lora" "$dir/out" "$dir/floor" "$dir/merge.yml"; fi; }
trap cleanup EXIT

if [ ! -d "$dir/a" ]; then
  $synth model --preset "$preset" --layers "$layers" --seed 1 --out "$dir/a"
  $synth model --preset "$preset" --layers "$layers" --seed 2 --out "$dir/b"
  $synth lora --preset "$preset" --layers "$layers" --rank "$rank" --seed 3 --out "$dir/lora"
fi
if [[ " $methods " == *" model_stock "* ]] && [ ! -d "$dir/c" ]; then
  $synth model --preset "$preset" --layers "$layers" --seed 4 --out "$dir/c"
fi
size=$(du -sb "$dir/a" | cut -f1)

# Warm the page cache the way every run below sees it.
cat "$dir"/a/*.safetensors "$dir"/b/*.safetensors "$dir"/lora/*.safetensors > /dev/null
[ -d "$dir/c" ] && cat "$dir"/c/*.safetensors > /dev/null

now() { date +%s.%N; }
min() { echo "$1 $2" | awk '{print ($1 < $2) ? $1 : $2}'; }
# The floor: read the inputs, write an output of the same size, sync — the best of writing
# it through the page cache and around it. Disk writes on a shared machine are noisy, so
# every measurement here is the best of $repeat runs.
measure_floor() {
  local best=999999
  for _ in $(seq $repeat); do
    best=$(min "$best" "$(floor_once "$1" buffered)")
    best=$(min "$best" "$(floor_once "$1" direct)")
  done
  echo "$best"
}
# One floor run over models "$1" (space-separated), writing a copy of model a with cp
# (through the page cache) or with dd oflag=direct (around it, as mergestream writes).
floor_once() {
  sync
  local t0 t1
  t0=$(now)
  for m in $1; do
    for f in "$dir/$m"/*.safetensors; do dd if="$f" of=/dev/null bs=16M status=none; done
  done
  mkdir -p "$dir/floor"
  if [ "$2" = direct ]; then
    for f in "$dir"/a/*.safetensors; do
      dd if="$f" of="$dir/floor/$(basename "$f")" bs=16M oflag=direct status=none
    done
  else
    cp "$dir"/a/*.safetensors "$dir/floor/"
  fi
  sync
  t1=$(now)
  rm -rf "$dir/floor"
  echo "$t1 - $t0" | bc -l
}
floor2=$(measure_floor "a b")
floor=$floor2
# model_stock reads three models: its rows are against a floor reading all three.
floor3=""
[ -d "$dir/c" ] && floor3=$(measure_floor "a b c")

# Gradient reaching 0 at layer 5 of 8 (the seed recipe's shape).
gradient="[0.9,0.72,0.54,0.36,0.18,0.0,0.0,0.0,0.0]"
# One timed run of binary $1 (the rest: its arguments); prints "wall rss_kib cpu_seconds"
# (cpu: user + system time of the process, steadier than the wall time on a shared machine).
timed() {
  local bin=$1; shift
  rm -rf "$dir/out"
  sync
  local t0 t1
  t0=$(now)
  /usr/bin/time -f "%M %U %S" -o "$dir/rss" "$bin" "$@"
  t1=$(now)
  echo "$(echo "$t1 - $t0" | bc -l) $(awk '{print $1, $2 + $3}' "$dir/rss")"
}
run() {
  local label=$1; shift
  local args=(blockmerge --model_path1 "$dir/a" --model_path2 "$dir/b"
    --gradient_values "$gradient" $filter -o "$dir/out" --quiet $extra "$@")
  variants "$label" "${args[@]}"
}
# A mergekit config for method $1 over the two models.
merge_config() {
  case "$1" in
    linear) printf 'merge_method: linear\nmodels:\n  - model: %s\n    parameters: {weight: 0.5}\n  - model: %s\n    parameters: {weight: 0.5}\ndtype: float16\n' "$dir/a" "$dir/b" ;;
    slerp) printf 'merge_method: slerp\nbase_model: %s\nmodels:\n  - model: %s\n  - model: %s\nparameters: {t: 0.4}\ndtype: float16\n' "$dir/a" "$dir/a" "$dir/b" ;;
    nuslerp) printf 'merge_method: nuslerp\nmodels:\n  - model: %s\n    parameters: {weight: 0.5}\n  - model: %s\n    parameters: {weight: 0.5}\ndtype: float16\n' "$dir/a" "$dir/b" ;;
    model_stock) printf 'merge_method: model_stock\nbase_model: %s\nmodels:\n  - model: %s\n  - model: %s\ndtype: float16\n' "$dir/a" "$dir/b" "$dir/c" ;;
    della) printf 'merge_method: della\nbase_model: %s\nmodels:\n  - model: %s\n    parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}\ndtype: float16\n' "$dir/a" "$dir/b" ;;
    *) printf 'merge_method: %s\nbase_model: %s\nmodels:\n  - model: %s\n    parameters: {weight: 1.0, density: 0.5}\ndtype: float16\n' "$1" "$dir/a" "$dir/b" ;;
  esac
}
# Rows of one command ($2...) labelled $1: at the default budget with --io $io, then at each
# other budget and --io mode, those with their time over the default row's ("own").
variants() {
  local label=$1; shift
  own_base=""
  measure "$label" "$@" --io "$io"
  for b in $budgets; do
    [ "$b" = default ] && continue
    measure "$label @$b" "$@" --io "$io" --memory-limit "$b"
  done
  for i in $ios; do
    [ "$i" = "$io" ] && continue
    measure "$label --io $i" "$@" --io "$i"
  done
  for w in $writes; do
    [ "$w" = auto ] && continue
    measure "$label --write $w" "$@" --io "$io" --write "$w"
  done
  own_base=""
}
run_merge() {
  merge_config "$1" > "$dir/merge.yml"
  if [ "$1" = model_stock ] && [ -n "$floor3" ]; then floor=$floor3; fi
  variants "merge $1" merge "$dir/merge.yml" "$dir/out" --quiet $extra
  floor=$floor2
}
# The wall time of the current command's default row, for the "own" column.
own_base=""
measure() {
  local label=$1; shift
  local args=("$@")
  local wall=999999 rss=0 old=999999 old_cpu=999999 cpu=999999
  for _ in $(seq $repeat); do
    local w r c
    read -r w r c < <(timed "$bin" "${args[@]}")
    wall=$(min "$wall" "$w")
    cpu=$(min "$cpu" "$c")
    rss=$(echo "$rss $r" | awk '{print ($1 > $2) ? $1 : $2}')
    if [ -n "$old_bin" ]; then
      read -r w r c < <(timed "$old_bin" "${args[@]}")
      old=$(min "$old" "$w")
      old_cpu=$(min "$old_cpu" "$c")
    fi
  done
  local ratio own="-"
  ratio=$(echo "$wall / $floor" | bc -l)
  if [ -n "$own_base" ]; then own=$(printf "%5.2fx" "$(echo "$wall / $own_base" | bc -l)"); else own_base=$wall; fi
  if [ -n "$old_bin" ]; then
    printf "| %-30s | %7.2f s | %5.2fx | %6s | %6.2f s | %6.0f MiB | %7.2f s | %5.2f | %6.2f s | %5.2f |\n" "$label" "$wall" "$ratio" "$own" \
      "$cpu" "$(echo "$rss / 1024" | bc -l)" "$old" "$(echo "$wall / $old" | bc -l)" "$old_cpu" "$(echo "$cpu / $old_cpu" | bc -l)"
  else
    printf "| %-30s | %7.2f s | %5.2fx | %6s | %6.2f s | %6.0f MiB |\n" "$label" "$wall" "$ratio" "$own" "$cpu" "$(echo "$rss / 1024" | bc -l)"
  fi
}

echo
echo "preset $preset, $layers layers, best of $repeat runs, $(echo "$size / 1073741824" | bc -l | cut -c1-5) GiB per model, LoRA rank $rank, io $io, $(nproc) cores"
echo
# "own": the row's time over its default-budget, --io $io row (the @budget and --io rows).
# "cpu": the least user + system time over the runs (compare compute-bound rows by it when
# the wall times are noisy).
if [ -n "$old_bin" ]; then
  echo "| run                            | wall      | floor  | own    | cpu      | peak RSS   | old wall  | new/old | old cpu  | cpu new/old |"
  echo "|--------------------------------|-----------|--------|--------|----------|------------|-----------|-------|----------|-------|"
else
  echo "| run                            | wall      | floor  | own    | cpu      | peak RSS   |"
  echo "|--------------------------------|-----------|--------|--------|----------|------------|"
fi
printf "| %-30s | %7.2f s | %5.2fx | %6s | %8s | %10s |\n" "I/O floor (dd + cp + sync)" "$floor" 1 "-" "-" "-"
[ -n "$floor3" ] && printf "| %-30s | %7.2f s | %5.2fx | %6s | %8s | %10s |\n" "floor with 3 inputs" "$floor3" 1 "-" "-" "-"
run "seed recipe, no LoRA"
run "seed recipe + LoRA at 0.25" --lora2 "$dir/lora" --lora2-weight 0.25
for m in $methods; do
  run_merge "$m"
done
