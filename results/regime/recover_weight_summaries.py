"""One-off: write the ``weight_summary.json`` of every regime run that predates that cache, from the values its
bench's committed ``sweep.csv`` holds (computed, when that row was reported, from the run's guide.safetensors
and adapter.safetensors on the machine that trained it; those files are not committed). After this, rebuilding
a report on a clone without the safetensors keeps the std-of-A and mean |A| columns.

    python results/regime/recover_weight_summaries.py results/regime/minilm_epistemic ...

A sweep row describes the first finished seed of its method (``blob_pyro.sweep.collect``), so the values go to
that seed's run folder. A run that has its safetensors here, or already has the file, is left alone; the file's
``source`` says where its numbers came from.
"""

import argparse
import csv
import json
import subprocess
from pathlib import Path

from blob_pyro import compare, sweep

KEYS = ("std_min", "std_median", "std_max", "noise_to_mean_median", "mean_abs_A")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benches", nargs="+", type=Path, help="sweep folders holding a sweep.csv")
    parser.add_argument("--seeds", default="1,2", help="the seeds the report used (comma-separated)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for bench in args.benches:
        table = bench / "sweep.csv"
        if not table.is_file():
            raise SystemExit(f"{table} does not exist: pass a sweep folder of results/regime")
        for row in csv.DictReader(table.open()):
            values = {k: float(row[k]) for k in KEYS if row.get(k, "") not in ("", "nan")}
            if row["method"].endswith("(N = 0)") or not values:
                continue
            folder = bench / f"epochs_{float(row['epochs']):g}"
            finished = compare.finished_seeds(folder, row["method"], seeds)
            if not finished:
                print(f"skip {folder}/{row['method']}: no finished run")
                continue
            run = compare.run_dir(folder, row["method"], finished[0])
            cache = run / sweep.WEIGHT_SUMMARY
            if cache.is_file() or (run / "guide.safetensors").is_file():
                print(f"keep {run}: it has {'the cache' if cache.is_file() else 'its safetensors'}")
                continue
            cache.write_text(json.dumps({"source": f"recovered from {table} at commit {commit}", **values},
                                        indent=1) + "\n")
            print(f"wrote {cache}")


if __name__ == "__main__":
    main()
