#!/usr/bin/env bash
# Fuzzes PeftServe's parsers with AFL++ (Debian's afl++) through SharpFuzz, and checks the findings.
#   tests/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default 20 s each, every target)
# Targets: safetensors, adapter-config, tokenizer, jinja, archive, guided-json (tests/PeftServe.Fuzz/FuzzTargets.cs).
# Seeds come from tests/fuzz/corpus/TARGET; AFL's output goes to artifacts/fuzz/findings/TARGET. Each
# crash found is copied to artifacts/fuzz/crashes/TARGET: keep it as a regression by moving it to
# tests/fuzz/regressions/TARGET (the test suite replays those and the seeds). Exit code 1 on any crash.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
seconds=${1:-20}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors adapter-config tokenizer jinja archive guided-json)
out=$repo/artifacts/fuzz
log() { printf '[fuzz] %s\n' "$*" >&2; }

command -v afl-fuzz >/dev/null || { log "afl-fuzz missing (apt-get install afl++)"; exit 2; }
export DOTNET_ROLL_FORWARD=Major   # the SharpFuzz tool targets an older runtime than the SDK's
if [ ! -x "$repo/.tools/sharpfuzz" ]; then
  log "installing the SharpFuzz instrumentation tool into .tools/"
  dotnet tool install SharpFuzz.CommandLine --version 2.3.0 --tool-path "$repo/.tools" >/dev/null
fi

# The harness's build output, hard-linked (no copy of the native libraries), with PeftServe.Core.dll
# copied for real and instrumented: the normal build's Core stays untouched.
build=$repo/tests/PeftServe.Fuzz/bin/${CONFIGURATION:-Release}/net10.0
[ -f "$build/PeftServe.Fuzz.dll" ] || dotnet build "$repo/tests/PeftServe.Fuzz" -c "${CONFIGURATION:-Release}" --nologo -v quiet
rm -rf "$out/bin"
mkdir -p "$out"
cp -al "$build" "$out/bin"
rm "$out/bin/PeftServe.Core.dll"
cp "$build/PeftServe.Core.dll" "$out/bin/PeftServe.Core.dll"
"$repo/.tools/sharpfuzz" "$out/bin/PeftServe.Core.dll" >/dev/null

export AFL_SKIP_BIN_CHECK=1 AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
       AFL_FORKSRV_INIT_TMOUT=120000 AFL_QUIET=1
crashes=0
for t in "${targets[@]}"; do
  rm -rf "$out/findings/$t"
  mkdir -p "$out/findings/$t"
  log "$t: fuzzing for $seconds s"
  # -t: 5 s per input (a slow first input while the JIT warms up is not a hang); -m none: .NET maps much more than AFL's default.
  afl-fuzz -i "$here/corpus/$t" -o "$out/findings/$t" -t 5000 -m none -V "$seconds" -- dotnet "$out/bin/PeftServe.Fuzz.dll" "$t" \
    >"$out/findings/$t.log" 2>&1 || { log "$t: afl-fuzz failed (see $out/findings/$t.log)"; tail -20 "$out/findings/$t.log" >&2; exit 2; }
  stats=$out/findings/$t/default/fuzzer_stats
  execs=$(awk -F': *' '$1 ~ /^execs_done/ {print $2}' "$stats")
  paths=$(awk -F': *' '$1 ~ /^corpus_count|^paths_total/ && p == "" {p = $2} END {print p}' "$stats")
  found=$(find "$out/findings/$t/default/crashes" -type f ! -name README.txt | wc -l)
  hangs=$(find "$out/findings/$t/default/hangs" -type f | wc -l)
  printf '%-15s %10s execs  %5s corpus entries  %3s crashes  %3s hangs\n' "$t" "$execs" "$paths" "$found" "$hangs"
  if [ "$found" -gt 0 ]; then
    crashes=$((crashes + found))
    mkdir -p "$out/crashes/$t"
    cp "$out/findings/$t/default/crashes/"id* "$out/crashes/$t/"
    dotnet "$build/PeftServe.Fuzz.dll" "$t" --replay "$out/crashes/$t" || true   # the uninstrumented build: it runs outside AFL
  fi
done
[ "$crashes" -eq 0 ] || { log "$crashes crashing inputs in $out/crashes"; exit 1; }
