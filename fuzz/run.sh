#!/usr/bin/env bash
# Build every fuzz target with the stable toolchain and run each for a while over a
# copy of its seed corpus. Exits non-zero if a target crashes (panics, fails an
# invariant, times out or runs out of memory) and prints the crashing input's path.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]      default: 20 s, every target
#
# Needs rustup's stable toolchain and a C++ compiler (libFuzzer is built from source
# by the libfuzzer-sys crate); no nightly, no cargo-fuzz. Environment:
#   FUZZ_JOBS=N     targets run side by side (default: the number of CPUs)
#   FUZZ_KEEP=DIR   keep the grown corpora there (default: a temp dir, removed)
#   FUZZ_ARGS="…"   extra libFuzzer flags, e.g. "-seed=1 -only_ascii=1"
set -euo pipefail

fuzz_dir="$(cd "$(dirname "$0")" && pwd)"
secs="${1:-20}"
shift || true
case "$secs" in '' | *[!0-9]*)
    echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
    ;;
esac

all_targets=()
for f in "$fuzz_dir"/fuzz_targets/*.rs; do
    all_targets+=("$(basename "$f" .rs)")
done
targets=("${@:-${all_targets[@]}}")
for t in "${targets[@]}"; do
    [[ -f "$fuzz_dir/fuzz_targets/$t.rs" ]] || {
        echo "unknown target $t (have: ${all_targets[*]})" >&2
        exit 2
    }
done

# What `cargo fuzz build --sanitizer none --debug-assertions` passes, minus its
# `-Ccodegen-units=1` (a much slower build for a little more speed per input), all
# of it stable. `--target` keeps the flags off build scripts and proc macros.
triple="$(rustc -vV | sed -n 's/^host: //p')"
flags=(
    --cfg fuzzing
    -Cpasses=sancov-module
    -Cllvm-args=-sanitizer-coverage-level=4
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
    -Cllvm-args=-sanitizer-coverage-pc-table
    -Cllvm-args=-sanitizer-coverage-trace-compares
    -Cllvm-args=-sanitizer-coverage-stack-depth
    -Cllvm-args=-simplifycfg-branch-fold-threshold=0
    -Cdebug-assertions
    -Coverflow-checks
)
export RUSTFLAGS="${flags[*]} ${RUSTFLAGS:-}"

start=$SECONDS
echo "== building ${#targets[@]} fuzz targets ($triple)"
bin_args=()
for t in "${targets[@]}"; do bin_args+=(--bin "$t"); done
cargo build --release --manifest-path "$fuzz_dir/Cargo.toml" \
    --target-dir "$fuzz_dir/target" --target "$triple" "${bin_args[@]}"
echo "== built in $((SECONDS - start)) s"
bin_dir="$fuzz_dir/target/$triple/release"

work="$(mktemp -d "${TMPDIR:-/tmp}/weft-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
corpora="$work/corpus"
if [[ -n "${FUZZ_KEEP:-}" ]]; then
    mkdir -p "$FUZZ_KEEP"
    corpora="$(cd "$FUZZ_KEEP" && pwd)"
fi

dict_for() {
    case "$1" in
    cni_args) echo "$fuzz_dir/dict/cni_args.dict" ;;
    *) echo "$fuzz_dir/dict/json.dict" ;;
    esac
}

run_one() {
    local t="$1" log="$work/$1.log"
    mkdir -p "$corpora/$t" "$fuzz_dir/artifacts/$t"
    if [[ -d "$fuzz_dir/corpus/$t" ]]; then
        cp -n "$fuzz_dir/corpus/$t"/* "$corpora/$t/" 2>/dev/null || true
    fi
    # shellcheck disable=SC2086
    "$bin_dir/$t" "$corpora/$t" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=16384 \
        -dict="$(dict_for "$t")" -artifact_prefix="$fuzz_dir/artifacts/$t/" \
        -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1
}

jobs_max="${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 1)}"
echo "== running ${#targets[@]} targets for ${secs} s each, $jobs_max at a time"
declare -A pid_of
for t in "${targets[@]}"; do
    while (($(jobs -rp | wc -l) >= jobs_max)); do wait -n || true; done
    run_one "$t" &
    pid_of[$t]=$!
done

failed=()
for t in "${targets[@]}"; do
    log="$work/$t.log"
    if wait "${pid_of[$t]}"; then
        # "#123 DONE cov: 1 ft: 2 corp: 3/4b lim: … exec/s: 5 rss: 6Mb"
        done_line="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)"
        runs="$(sed -n 's/^stat::number_of_executed_units:[[:space:]]*//p' "$log")"
        echo "ok    $t: ${runs:-?} runs; ${done_line#* DONE   }"
    else
        failed+=("$t")
        cp "$log" "$fuzz_dir/artifacts/$t/fuzz.log"
        echo "FAIL  $t (log: $fuzz_dir/artifacts/$t/fuzz.log)"
        # The panic message, libFuzzer's verdict and the input.
        awk '/panicked at/ {p = 1} /^stack backtrace:|^note: / {p = 0} p' "$log" |
            head -30 | sed 's/^/      /'
        grep -E "^(SUMMARY|==[0-9]+== ERROR)" "$log" | sed 's/^/      /' || true
        grep -o "Test unit written to .*" "$log" | sort -u |
            sed "s/^Test unit written to /      crash input: /" || true
    fi
done

echo "== done in $((SECONDS - start)) s"
if ((${#failed[@]})); then
    echo "reproduce: $bin_dir/<target> <crash input>  (see fuzz/README.md)" >&2
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
