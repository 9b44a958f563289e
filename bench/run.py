"""gpurun's benchmarks: measure each figure, compare it with its goal, print one table.

    python bench/run.py            # the full run (`make bench`)
    python bench/run.py --quick    # small sizes, goals not checked (run inside `make test`)
    python bench/run.py --only launch,views   # some of the figures

Every figure runs the real CLI against a private state dir and fake GPUs declared in a
temporary config, so it needs no GPU and touches no shared state. Figures that are ratios
compare gpurun with something measured in the same run, interleaved, so that they hold on a
loaded machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import Figure
from handoff import handoff_figures
from overhead import contention_figures, footprint_figure, launch_figure
from slurm import slurm_overhead_figures
from views import views_figures

FIGURES = {
    "launch": lambda root, quick: [launch_figure(root, quick)],
    "views": views_figures,
    "contention": contention_figures,
    "footprint": lambda root, quick: [footprint_figure(root, quick)],
    "handoff": handoff_figures,
    "slurm": slurm_overhead_figures,
}


def print_table(figures: list[Figure]) -> None:
    rows = [("FIGURE", "VALUE", "GOAL", "MET")]
    for figure in figures:
        met = "-" if figure.met is None else ("yes" if figure.met else "NO")
        rows.append((figure.name, figure.value, figure.goal, met))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, goals not checked")
    parser.add_argument(
        "--only", default=",".join(FIGURES), help=f"comma-separated, of {', '.join(FIGURES)}"
    )
    args = parser.parse_args()
    chosen = args.only.split(",")
    unknown = set(chosen) - set(FIGURES)
    if unknown:
        parser.error(f"unknown figures: {', '.join(sorted(unknown))}")

    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="gpurun-bench-") as tmp:
        for name in chosen:
            figures.extend(FIGURES[name](Path(tmp) / name, args.quick))

    print_table(figures)
    return 0 if all(figure.met is not False for figure in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
