#!/usr/bin/env bash
# Build the codec fuzzer (clang, libFuzzer, ASan + UBSan) and run it.
#   tools/fuzz/run.sh [SECONDS] [extra libFuzzer args]     (default 60 s)
# The seed corpus is made from the real model files: the small ones whole, and the
# leading bytes of the large ones (a fuzzer mutates small inputs far faster).
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-60}; shift || true
OUT=build/fuzz
mkdir -p "$OUT/corpus" "$OUT/findings"
CXX=${CXX_FUZZ:-clang++}
if ! command -v "$CXX" >/dev/null; then
  echo "clang++ not found: apt-get install clang libclang-rt-14-dev" >&2; exit 1
fi
"$CXX" -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -Icpp cpp/codec.cpp tools/fuzz/fuzz_codec.cpp -o "$OUT/fuzz_codec"
python3 tools/fuzz/make_corpus.py "$OUT/corpus"
"$OUT/fuzz_codec" "$OUT/corpus" -max_total_time="$SECS" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix="$OUT/findings/" -print_final_stats=1 "$@"
