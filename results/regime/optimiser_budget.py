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
  init), i.e. (b - S)^2 / (2 b) for S = lr * sum f_t < b, else 0.

Run from the repository root: ``python results/regime/optimiser_budget.py results/regime/minilm_epistemic 576 16
384`` (sweep folder, training examples, batch size, fan-in of the adapted layers); prints a Markdown table.
Settings (lr, kllr, eps, prior scale, warm-up) are read from each run's config.json.
"""

import csv
import json
import math
import sys
from pathlib import Path

from blob_pyro.schedules import kl_reweighting_pi, linear_warmup_decay, rescaled_cycle_length


def sgd_kl_std(g0: float, steps: int, *, kllr: float, cycle: int, warmup: float, sigma_p: float) -> float:
    """sigma_T = G_T^2 under the official KL step alone."""
    factor, g = linear_warmup_decay(steps, warmup), g0
    for t in range(steps):
        g += kllr * factor(t) * kl_reweighting_pi(t, cycle, "blob") * (2 / g - 2 * g**3 / sigma_p**2)
    return g * g


def adam_budget(steps: int, *, lr: float, warmup: float) -> float:
    """S = lr * sum_t f_t: the most Adam can move one entry in ``steps`` steps."""
    factor = linear_warmup_decay(steps, warmup)
    return lr * sum(factor(t) for t in range(steps))


def mean_abs_after_pull(budget: float, bound: float) -> float:
    """E max(0, |M_0| - S) for M_0 ~ U(-b, b)."""
    return (bound - budget) ** 2 / (2 * bound) if budget < bound else 0.0


def main(folder: str, num_train: int, batch_size: int, fan_in: int) -> str:
    rows = list(csv.DictReader(open(Path(folder) / "sweep.csv")))

    def value(method: str, e: float, key: str) -> float:
        return next((float(r[key]) for r in rows if r["method"] == method and float(r["epochs"]) == e
                     and r.get(key) not in (None, "")), float("nan"))

    steps_per_epoch, cycle, bound = math.ceil(num_train / batch_size), rescaled_cycle_length(num_train, batch_size), fan_in**-0.5
    lines = ["| epochs (steps) | blob_official std of A: predicted min / median / max | measured | blob (ELBO) std bound "
             "(median G_0) | measured median | mean abs A, prior pull alone | map | blob (ELBO) M | mle |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in sorted({float(r["epochs"]) for r in rows}):
        steps = round(e * steps_per_epoch)
        run = next(Path(folder).glob(f"epochs_{e:g}/blob*/seed_*/config.json"), None)
        if run is None:
            continue
        cfg = json.loads(run.read_text())
        g0s = (cfg["eps"] / math.sqrt(2), (cfg["eps"] / math.sqrt(2) + cfg["eps"]) / 2, cfg["eps"])
        official = [sgd_kl_std(g, steps, kllr=cfg["kllr"], cycle=cycle, warmup=cfg["warmup_ratio"], sigma_p=cfg["prior_scale"])
                    for g in g0s]
        budget = adam_budget(steps, lr=cfg["lr"], warmup=cfg["warmup_ratio"])
        measured = " / ".join(f"{value('blob_official', e, k):.4f}" for k in ("std_min", "std_median", "std_max"))
        lines.append(f"| {e:g} ({steps}) | {' / '.join(f'{s:.4f}' for s in official)} | {measured} | "
                     f"{(g0s[1] + budget) ** 2:.4f} | {value('blob', e, 'std_median'):.4f} | "
                     f"{mean_abs_after_pull(budget, bound):.4f} (init {bound / 2:.4f}) | {value('map', e, 'mean_abs_A'):.4f} | "
                     f"{value('blob', e, 'mean_abs_A'):.4f} | {value('mle', e, 'mean_abs_A'):.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
