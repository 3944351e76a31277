"""The compact table of a sweep folder for results/regime/README.md: one row per training length, one column per
method (and N = 0 for sampling methods), each cell ACC % / ECE % / NLL (mean over the finished seeds; the seed
count in brackets when more than one), read from the folder's sweep.csv.

Run from the repository root: ``python results/regime/tables.py results/regime/minilm_fact_checker``.
"""

import argparse
import csv
from pathlib import Path

ORDER = ["mle", "temperature", "map", "laplace_kfac", "blob", "blob (N = 0)", "blob_official", "blob_official (N = 0)"]
LABEL = {"laplace_kfac": "laplace_kfac (probit)", "blob": "blob (ELBO) N = 10", "blob (N = 0)": "blob (ELBO) N = 0",
         "blob_official": "blob_official N = 10", "blob_official (N = 0)": "blob_official N = 0"}


def table(folder: str) -> str:
    path = Path(folder) / "sweep.csv"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run `python -m blob_pyro.sweep ... --output-dir {folder}` "
                         "(or the same command with --report-only) first")
    rows = list(csv.DictReader(open(path)))
    present = list(dict.fromkeys(r["method"] for r in rows if not r["method"].startswith("zero-shot")))
    methods = [m for m in ORDER if m in present] + [m for m in present if m not in ORDER]
    lengths = sorted({float(r["epochs"]) for r in rows})
    lines = ["| epochs | " + " | ".join(LABEL.get(m, m) for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for e in lengths:
        cells = []
        for m in methods:
            r = next((r for r in rows if r["method"] == m and float(r["epochs"]) == e), None)
            if r is None:
                cells.append("not run")
                continue
            seeds = int(r["seeds"])
            cell = f"{float(r['acc_mean']):.2f} / {float(r['ece_mean']):.2f} / {float(r['nll_mean']):.3f}"
            cells.append(cell + (f" ({seeds} seeds)" if seeds > 1 else ""))
        lines.append(f"| {e:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a sweep output folder holding sweep.csv")
    print(table(parser.parse_args().folder))
