#!/usr/bin/env bash
# Builds what the GPU machine runs, in .gpu/ (git-ignored; carry it): the CLI bundle made by ../shared/gpu/pack.sh,
# the python peers from ../shared/bench, minus the plotting libraries no GPU script uses (SkiaSharp and HarfBuzz,
# 11 MB: every script passes --no-plot), so that bundle and tracked files stay under the device tool's 64 MiB.
#   bash loadtests/gpu/pack.sh        (from the repo root)
set -euo pipefail
../shared/gpu/pack.sh src/PeftServe.Cli/PeftServe.Cli.csproj
cp ../shared/bench/*.py .gpu/
rm -f .gpu/app/runtimes/linux-x64/native/libSkiaSharp.so .gpu/app/runtimes/linux-x64/native/libHarfBuzzSharp.so
bundle=$(du -sb .gpu | cut -f1)
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((bundle + tracked))
echo "travels: $((total / 1048576)) MiB (.gpu $((bundle / 1048576)) MiB + tracked files $((tracked / 1048576)) MiB; the limit is 64 MiB)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "over the device tool's limit: carry less" >&2; exit 1; }
