#!/usr/bin/env bash
# Regenerate every report of the regime study from the finished runs (no training, no evaluation):
# each bench's sweep.md / sweep.csv / sweep.png and epochs_<E>/ tables, then the compact tables and the
# optimiser-budget tables of results/regime/README.md (printed). Run from the repository root:
#   bash results/regime/report.sh > /tmp/regime_tables.md
# A sweep that is still running rewrites its bench's sweep.md with the subset it ran; run this afterwards.
# The std-of-A and mean |A| columns are read from each run's guide.safetensors / adapter.safetensors (not
# committed) and cached in its weight_summary.json (committed); where a run has neither, those columns would
# come out empty, so this refuses to run (FORCE=1 overrides). The report reads the first finished seed of each
# method, so that is the run checked.
set -euo pipefail
R=results/regime
missing=$(for method in $(find $R -mindepth 3 -maxdepth 3 -type d -path '*/epochs_*/*' | sort); do
  first=$(ls -d "$method"/seed_* 2>/dev/null | sort -V | while read -r d; do [ -f "$d/metrics.json" ] && echo "$d" && break; done)
  [ -n "$first" ] || continue
  [ -f "$first/guide.safetensors" ] || [ -f "$first/weight_summary.json" ] || echo "$first"; done |
  grep -v -e /temperature/ -e /laplace_kfac/ || true)
if [ -n "$missing" ] && [ "${FORCE:-0}" != 1 ]; then
  echo "these runs have neither safetensors nor weight_summary.json here, so their std-of-A / mean |A| columns" >&2
  echo "would be lost:" >&2
  echo "$missing" | head -5 >&2
  echo "rebuild the report on the machine that ran them (it writes weight_summary.json), or set FORCE=1" >&2
  exit 1
fi
ALL="--report-only --epochs 1,4,12,31 --methods mle,temperature,map,laplace_kfac,blob_official,blob --seeds 1,2 --eval-samples 10 --checkpoint-every 100"
MINILM="--model minilm --task-type sequence_classification --target-modules query,value,classifier --num-calibration 64 --batch-size 16 --lr 5e-4 --kllr 0.002"
SMOL="--model smollm2 --task bundled:social_iqa --split-file $R/split_social_iqa_576_64_400.json --num-calibration 64 --batch-size 4 --lr 1e-3 --kllr 0.01"
python -m blob_pyro.sweep $ALL --output-dir $R/minilm_epistemic $MINILM \
  --task ../shared/data/bigbench/epistemic_reasoning.json --split-file $R/split_epistemic_reasoning_576_64_400.json >&2
python -m blob_pyro.sweep $ALL --output-dir $R/minilm_fact_checker $MINILM \
  --task ../shared/data/bigbench/fact_checker__fever.json --split-file $R/split_fact_checker_576_64_400.json >&2
python -m blob_pyro.sweep $ALL --output-dir $R/smollm2_social_iqa $SMOL >&2
for bench in minilm_epistemic:384 minilm_fact_checker:384 smollm2_social_iqa:576; do
  folder=$R/${bench%%:*}
  echo "## ${bench%%:*}"; echo
  python $R/tables.py "$folder"; echo
  python $R/optimiser_budget.py "$folder" "${bench##*:}"; echo
done
