"""Predict the BLoB posterior's std of A and the prior's pull on A from the optimiser arithmetic alone (no data),
and put the prediction next to what the finished runs of a sweep folder measured.

* Official recipe (``blob_official``): the std (sigma = G^2) moves only by the SGD step on pi_t * KL (plus the
  batch-mean NLL's gradient on G, left out here). Per entry, with the closed-form KL against N(0, sigma_p^2):
  dKL/dG = -2 / G + 2 G^3 / sigma_p^2, so G <- G + kllr * f_t * pi_t * (2 / G - 2 G^3 / sigma_p^2), f_t the
  warm-up/decay factor, pi_t the blob re-weighting with dataset rescaling (Wang et al. 2024, sec. 3.3 / app.).
  Iterated here from G_0 = eps / sqrt(2), the median of U(eps / sqrt(2), eps), and eps.
* Textbook ELBO under Adam (``blob``, ``map``): LoRA starts at B = 0, where the likelihood gradient on A is 0,
  so Adam moves each entry of G up and of M towards 0 by up to lr * f_t per step (the prior's pull,
  whatever its weight; tests/test_prior_pull_at_zero_B.py). Bound: G_T = G_0 + lr * sum f_t, and
  mean |M_T| = E max(0, |M_0| - lr * sum f_t) with M_0 ~ U(-b, b), b = 1 / sqrt(fan_in) (kaiming-uniform LoRA
  init), i.e. (b - S)^2 / (2 b) for S = lr * sum f_t < b, else 0 (Adam then jitters around 0 at about
  lr * f_t, which is what a measured value near 0 shows). Approximate: Adam's step can exceed lr early on.

Run from the repository root: ``python results/regime/optimiser_budget.py results/regime/minilm_epistemic 384``
(sweep folder, fan-in of the adapted layers: 384 for MiniLM, 576 for SmolLM2's q/v); prints a Markdown table.
Every setting (steps, lr, kllr, eps, prior scale, warm-up, KL schedule, cycle length, KL weight, spread lr
factor) is read from the first seed's config.json and split.json of each method and length.
"""

import argparse
import csv
import json
import math
from pathlib import Path

from blob_pyro.objectives import KLWeighting
from blob_pyro.schedules import kl_cycle_length, linear_warmup_decay


def sgd_kl_std(g0: float, steps: int, *, kllr: float, kl: KLWeighting, warmup: float, sigma_p: float) -> float:
    """sigma_T = G_T^2 under the official KL step alone (pi_t = ``kl.multiplier * kl.pi(t)``, as ParityObjective)."""
    factor, g = linear_warmup_decay(steps, warmup), g0
    for t in range(steps):
        g += kllr * factor(t) * kl.multiplier * kl.pi(t) * (2 / g - 2 * g**3 / sigma_p**2)
    return g * g


def adam_budget(steps: int, *, lr: float, warmup: float) -> float:
    """S = lr * sum_t f_t: about the most Adam moves one entry in ``steps`` steps (its step is lr * f_t * m / sqrt(v),
    at most ~lr * f_t while the gradient keeps its sign; near 0 it jitters at that size)."""
    factor = linear_warmup_decay(steps, warmup)
    return lr * sum(factor(t) for t in range(steps))


def mean_abs_after_pull(budget: float, bound: float) -> float:
    """E max(0, |M_0| - S) for M_0 ~ U(-b, b)."""
    return (bound - budget) ** 2 / (2 * bound) if budget < bound else 0.0


def run_settings(folder: Path, epochs: float, method: str):
    """(config, number of training examples) of the first seed's run of ``method`` at ``epochs``, or None."""
    run = next(iter(sorted((folder / f"epochs_{epochs:g}" / method).glob("seed_*/config.json"))), None)
    if run is None:
        return None
    return json.loads(run.read_text()), len(json.loads((run.parent / "split.json").read_text())["train"])


def read_sweep_csv(folder: Path) -> list:
    """The rows of ``folder/sweep.csv``; a clear error when the folder holds no sweep report yet."""
    path = folder / "sweep.csv"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run `python -m blob_pyro.sweep ... --output-dir {folder}` "
                         "(or the same command with --report-only) first")
    return list(csv.DictReader(open(path)))


def main(folder: str, fan_in: int) -> str:
    folder = Path(folder)
    rows = read_sweep_csv(folder)

    def value(method: str, e: float, key: str) -> str:
        """The measured ``key`` of ``method`` at ``e`` epochs, 4 decimals, or "" when that run does not exist."""
        found = next((float(r[key]) for r in rows if r["method"] == method and float(r["epochs"]) == e
                      and r.get(key) not in (None, "")), None)
        return "" if found is None else f"{found:.4f}"

    bound = fan_in**-0.5
    lines = ["| epochs (steps) | blob_official std of A: predicted min / median / max | measured | blob (ELBO) std bound "
             "(median G_0) | measured median | mean abs A, prior pull alone | map | blob (ELBO) M | mle |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in sorted({float(r["epochs"]) for r in rows}):
        official, elbo = run_settings(folder, e, "blob_official"), run_settings(folder, e, "blob")
        cells, steps = [], None
        if official:
            cfg, n = official
            steps = cfg["max_steps"]
            kl = KLWeighting(cfg["kl_schedule"], kl_cycle_length(n, cfg["batch_size"], dataset_rescaling=cfg["dataset_rescaling"],
                                                                 gamma=cfg["gamma"]), cfg["kl_weight"])
            g0s = (cfg["eps"] / math.sqrt(2), (cfg["eps"] / math.sqrt(2) + cfg["eps"]) / 2, cfg["eps"])
            predicted = [sgd_kl_std(g, steps, kllr=cfg["kllr"], kl=kl, warmup=cfg["warmup_ratio"], sigma_p=cfg["prior_scale"])
                         for g in g0s]
            cells += [" / ".join(f"{s:.4f}" for s in predicted),
                      " / ".join(value('blob_official', e, k) for k in ("std_min", "std_median", "std_max"))]
        else:
            cells += ["", ""]
        if elbo:
            cfg, _ = elbo
            steps = cfg["max_steps"]
            g0 = (cfg["eps"] / math.sqrt(2) + cfg["eps"]) / 2
            spread = adam_budget(steps, lr=cfg["lr"] * cfg["scale_lr_factor"], warmup=cfg["warmup_ratio"])
            cells += [f"{(g0 + spread) ** 2:.4f}", value('blob', e, 'std_median')]
        else:
            cells += ["", ""]
        pulled = elbo or run_settings(folder, e, "map")  # the prior's pull on A under Adam (same lr for M and MAP's A)
        pull = ""
        if pulled:
            cfg, _ = pulled
            steps = cfg["max_steps"]
            pull = f"{mean_abs_after_pull(adam_budget(steps, lr=cfg['lr'], warmup=cfg['warmup_ratio']), bound):.4f} (init {bound / 2:.4f})"
        cells += [pull] + [value(m, e, 'mean_abs_A') for m in ("map", "blob", "mle")]
        lines.append(f"| {e:g} ({steps if steps is not None else '?'}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a sweep output folder holding sweep.csv and epochs_<E>/<method>/seed_<s>/")
    parser.add_argument("fan_in", type=int, help="fan-in of the adapted layers (384 for MiniLM, 576 for SmolLM2's q/v)")
    args = parser.parse_args()
    if args.fan_in <= 0:
        parser.error(f"fan_in must be a positive integer, got {args.fan_in}")
    print(main(args.folder, args.fan_in))
