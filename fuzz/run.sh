#!/usr/bin/env bash
# Builds Kiln's cargo-fuzz targets once, then runs each for SECONDS (default 60) on its corpus.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# Corpora grow in fuzz/corpus/TARGET (gitignored, kept between runs, so later runs start where
# earlier ones stopped); fuzz/seeds/TARGET (committed) seeds them. Fails when a target crashes,
# leaks, times out on one input or runs out of memory, printing the log's tail (the stack trace)
# and the saved input (fuzz/artifacts/TARGET/...); reproduce with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -a TARGET fuzz/artifacts/TARGET/crash-...
# from fuzz/. KILN_FUZZ_SANITIZER=none builds without AddressSanitizer (faster, finds less).
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-60}
shift || true
sanitizer=${KILN_FUZZ_SANITIZER:-address}
# cargo-fuzz passes nightly-only rustc flags (-Zsanitizer, the coverage passes); this lets the
# stable toolchain accept them.
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

if ! cargo fuzz --version >/dev/null 2>&1; then
    nice -n 19 cargo install cargo-fuzz --locked
fi

start=$(date +%s)
# -a: debug assertions and overflow checks on, so arithmetic on guest values that overflows is
# a crash here rather than a silent wrap.
nice -n 19 cargo fuzz build -a --sanitizer "$sanitizer"
bin_dir=target/x86_64-unknown-linux-gnu/release
echo "fuzz: built in $(($(date +%s) - start)) s"

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# The device and loader targets make files and sockets; keep them in one place we remove.
scratch=$(mktemp -d /dev/shm/kiln-fuzz.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$scratch"' EXIT

failed=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    dirs=("corpus/$target")
    [ -d "seeds/$target" ] && dirs+=("seeds/$target")
    log="$scratch/$target.log"
    t0=$(date +%s)
    if TMPDIR="$scratch" ASAN_OPTIONS=detect_odr_violation=0 nice -n 19 "$bin_dir/$target" \
        "${dirs[@]}" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="artifacts/$target/" >"$log" 2>&1; then
        runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -1 || true)
        echo "fuzz: $target: ok, ${runs#Done } in $(($(date +%s) - t0)) s, corpus $(ls "corpus/$target" | wc -l) inputs"
    else
        failed+=("$target")
        echo "fuzz: $target: FAILED after $(($(date +%s) - t0)) s; the end of its log:"
        tail -n 80 "$log"
        grep -h 'Test unit written to\|artifact_prefix' "$log" | sed "s|^|fuzz: $target: |" || true
        for input in $(grep -o 'written to [^ ]*' "$log" | cut -d' ' -f3); do
            echo "fuzz: $target: input $PWD/$input (hex: $(head -c 512 "$input" | od -An -tx1 | tr -d ' \n'))"
        done
    fi
done

echo "fuzz: ${#targets[@]} targets, $seconds s each, $(($(date +%s) - start)) s in all"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}"
    exit 1
fi

# The corpora just grown, replayed against the real binary with its filters on
# (tests/tests/fuzz_replay.rs; the test run before this saw only the seeds). Built by the
# workspace's own toolchain settings, not the fuzz build's.
t0=$(date +%s)
if ! (cd .. && env -u RUSTC_BOOTSTRAP cargo build --workspace --quiet &&
    env -u RUSTC_BOOTSTRAP cargo test --quiet -p kiln-tests --test fuzz_replay -- --nocapture); then
    echo "fuzz: FAILED: replaying the corpora against the kiln binary"
    exit 1
fi
echo "fuzz: corpora replayed against the kiln binary in $(($(date +%s) - t0)) s"
