#!/usr/bin/env bash
# One line per kernel of a CUBIN: registers and stack bytes per thread (local memory where none is meant, e.g. a
# register array kept in memory) and the longest run of global loads issued before an FMA or tensor-core MMA uses one
# (a round of add_low_rank, row_terms.cuh, is 16 rows of B and 16 coefficients: about 32 when all are in flight, 2-3
# when ptxas sank them next to their FMAs). Shared by sass-local.sh (here) and run-all.sh's sass section (GPU machine).
#   bash loadtests/gpu/sass-report.sh CUOBJDUMP CUBIN [KERNEL_REGEX]
set -uo pipefail
cuobj=$1 bin=$2 only=${3:-.*}
"$cuobj" -res-usage "$bin" | grep -A1 "Function " | paste - - | sed -E 's/.*Function ([A-Za-z0-9_]+):.*REG:([0-9]+) STACK:([0-9]+).*/\1 \2 \3/' |
while read -r kernel regs stack; do
  [[ $kernel =~ ^($only)$ ]] || continue
  run=$("$cuobj" -sass -fun "$kernel" "$bin" | grep -E "LDG|FFMA|HMMA" | awk '/LDG/{n++; if(n>m)m=n} /FFMA|HMMA/{n=0} END{print m+0}')
  printf "  %-28s registers %3s  stack %3s  longest load run %s\n" "$kernel" "$regs" "$stack" "$run"
done
