"""Summarises an Nsight Compute CSV (--page raw, metric gpu__time_duration.sum) of eager decode steps: per kernel
name, launches per decode step (steps = paged_decode_attention launches / layers), median and total time, share of
the profiled time. Medians keep the few prefill launches in the window from skewing a kernel's figure."""
import csv, statistics, sys
from collections import defaultdict

path, layers = sys.argv[1], int(sys.argv[2])
rows = list(csv.reader(open(path)))
header = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
cols = rows[header]
name_at, time_at = cols.index("Kernel Name"), cols.index("gpu__time_duration.sum")
unit = rows[header + 1][time_at] if not rows[header + 1][time_at].replace(".", "").isdigit() else "ns"
scale = {"ns": 1e-3, "nsecond": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(unit, 1e-3)
grid_at = cols.index("Grid Size") if "Grid Size" in cols else None
times = defaultdict(list)
by_grid = defaultdict(lambda: defaultdict(list))   # name -> grid size -> times: one kernel launched in several shapes
for r in rows[header + 1:]:
    if len(r) <= time_at:
        continue
    try:
        t = float(r[time_at].replace(",", "")) * scale
    except ValueError:
        continue
    name = r[name_at].split("(")[0].replace("void ", "")
    times[name[:70]].append(t)
    if grid_at is not None and len(r) > grid_at:
        by_grid[name[:70]][r[grid_at]].append(t)
total = sum(sum(v) for v in times.values())
# Steps: the decode-attention kernel runs once per layer (other kernels named "attention", such as LLaMA-Adapter's, do not).
attention = sum(len(v) for k, v in times.items() if "paged_decode_attention" in k)
if attention == 0:  # no attention kernel recognised: take the most launched kernel as once per layer
    attention = max(len(v) for v in times.values())
steps = max(attention / layers, 1e-9)
print(f"{sum(len(v) for v in times.values())} launches, {total / 1e3:.2f} ms of kernel time, about {steps:.1f} decode steps "
      f"(attention launches / {layers} layers): {total / steps / 1e3:.3f} ms of kernels per step")
print(f"{'kernel':70s} {'per step':>8s} {'median us':>9s} {'us/step':>8s} {'share':>6s}")
for name, v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
    per_step = len(v) / steps
    med = statistics.median(v)
    print(f"{name:70s} {per_step:8.1f} {med:9.2f} {per_step * med:8.1f} {sum(v) / total:6.1%}")
    grids = by_grid.get(name, {})
    if len(grids) > 1:   # the same kernel in several launch shapes: each shape's share of it
        for grid, g in sorted(grids.items(), key=lambda kv: -sum(kv[1])):
            print(f"{'  grid ' + grid:70s} {len(g) / steps:8.1f} {statistics.median(g):9.2f} {len(g) / steps * statistics.median(g):8.1f} {sum(g) / total:6.1%}")
