#!/usr/bin/env bash
# Does ADAG train a small transformer as well as DDP? examples/char_lm.py with ADAG, DDP and ADAG with outer
# Nesterov momentum on one data budget, the three interleaved round by round so the machine's load falls on each
# alike; then benchmarks/results/char-lm/table.md over every run there.
#     bash benchmarks/char_lm.sh 1 2 3        # the rounds to run (a run already there is not repeated)
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/char-lm
common=(--devices 2 --epochs 3 --chars 400000 --layers 2 --width 64 --heads 4 --block 64 --batch-size 32
  --warmup 20 --val-every 0.25 --sample 0)
declare -A options=([adag]="--strategy adag" [ddp]="--strategy ddp"
  [adag-nesterov]="--strategy adag --outer-momentum 0.5 --outer-lr 0.5")
for round in "${@:-1}"; do
  for name in adag ddp adag-nesterov; do
    [[ -e $out/$name-r$round/curve.json ]] && continue
    echo "$(date -u +%T) $name round $round; load $(cut -d' ' -f1-3 /proc/loadavg)"
    # shellcheck disable=SC2086
    nice -n 10 timeout 900 python examples/char_lm.py "${common[@]}" ${options[$name]} --out "$out/$name-r$round"
  done
done
python - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {}
for path in sorted(out.glob("*-r*/curve.json")):
    runs.setdefault(path.parent.name.rsplit("-r", 1)[0], []).append(json.loads(path.read_text()))
rows = ["| run | runs | final val loss (median) | all final val losses | training s (median) | val loss at 1/3 of the budget (median) |",
        "|---|---|---|---|---|---|"]
for name, results in runs.items():
    finals = [r["val_loss"] for r in results]
    third = [r["curve"][len(r["curve"]) // 3 - 1][2] for r in results]
    seconds = [r["curve"][-1][0] for r in results]
    rows.append(f"| {name} | {len(results)} | {statistics.median(finals):.4f} | {', '.join(f'{f:.4f}' for f in finals)} "
                f"| {statistics.median(seconds):.0f} | {statistics.median(third):.4f} |")
(out / "table.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

figure, axes = plt.subplots(1, 2, figsize=(11, 4))
for (name, results), color in zip(runs.items(), ("C0", "C1", "C2")):
    for i, r in enumerate(results):
        seconds, steps, losses = zip(*r["curve"])
        axes[0].plot(seconds, losses, color=color, marker=".", label=name if i == 0 else None)
        axes[1].plot(steps, losses, color=color, marker=".", label=name if i == 0 else None)
axes[0].set_xlabel("training seconds (2 loaded cores)")
axes[1].set_xlabel("steps per worker (same data budget)")
for ax in axes:
    ax.set_ylabel("validation loss (nats per character)")
    ax.legend()
figure.tight_layout()
figure.savefig(out / "val_loss_vs_time.png", dpi=100)
PY
