"""How far posterior draws of A move a LoRA layer's weight update, next to the update itself.

A LoRA layer adds ``delta W = s * B @ A`` (``s = alpha / r``). With ``A ~ N(M, std^2)`` elementwise
(BLoB's q(A)) and B deterministic, ``delta W = s * B @ M + s * B @ eps`` with ``eps_ki ~ N(0, std_ki^2)``:

* ``mean_update_norm`` = ``||s B M||_F``: the update the posterior mean makes;
* ``sampled_update_rms`` = ``sqrt(E ||s B eps||_F^2) = s * sqrt(sum_k ||B[:, k]||^2 * sum_i std_ki^2)``: the
  root-mean-square size of the random part of one draw.

Their ratio says whether sampling can matter at all in weight space: a ratio far below 1 means every
draw is nearly the mean update. A ratio near or above 1 with unchanged predictions means the noise
points in directions the task's logits do not feel (isotropic noise in a 576-dimensional input space).
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["update_spread", "spread_by_layer", "posterior_trace"]


def update_spread(B: torch.Tensor, loc: torch.Tensor, std: torch.Tensor, *, scaling: float = 1.0) -> dict[str, float]:
    """Weight-space size of one LoRA layer's mean update and of the random part of a posterior draw.

    Args:
        B: ``(out_features, r)``; loc: ``(r, in_features)`` the posterior mean of A; std: ``(r, in_features)``
        its elementwise std (non-negative); scaling: ``alpha / r``.

    Returns floats ``mean_update_norm``, ``sampled_update_rms``, their ``ratio`` (inf when the mean update
    is 0), ``mean_abs_loc`` and ``mean_std``.
    """
    if B.dim() != 2 or loc.dim() != 2 or B.shape[1] != loc.shape[0]:
        raise ValueError(f"B must be (out, r) and loc (r, in) with the same r, got {tuple(B.shape)} and {tuple(loc.shape)}")
    if std.shape != loc.shape:
        raise ValueError(f"std must have loc's shape {tuple(loc.shape)}, got {tuple(std.shape)}")
    if bool((std < 0).any()):
        raise ValueError("std must be non-negative")
    B, loc, std = B.double(), loc.double(), std.double()
    mean_norm = float(scaling * torch.linalg.matrix_norm(B @ loc))
    rms = float(scaling * ((B ** 2).sum(0) * (std ** 2).sum(1)).sum().sqrt())
    return {
        "mean_update_norm": mean_norm,
        "sampled_update_rms": rms,
        "ratio": rms / mean_norm if mean_norm > 0 else float("inf"),
        "mean_abs_loc": float(loc.abs().mean()),
        "mean_std": float(std.mean()),
    }


def spread_by_layer(model, guide) -> dict[str, dict[str, float]]:
    """:func:`update_spread` for every A site of ``guide`` (a guide with per-site Gaussian marginals,
    ``guide.loc_and_scale(site)``, e.g. ``BLoBGuide``; not one that samples B) on ``model`` (a
    :class:`~blob_pyro.models.BayesianLoRAModel`), keyed by site."""
    if not guide.has_loc_and_scale():
        raise ValueError(f"{type(guide).__name__} has no per-site loc/scale: weight-space spread needs a Gaussian guide such as 'blob'")
    if guide.bayesian_B:
        raise ValueError(f"{type(guide).__name__} samples B too; this measure assumes B deterministic (the 'blob' guide)")
    adapters: Mapping = model.adapters
    out = {}
    with torch.no_grad():
        for site in guide.site_names:
            layer = adapters[site]
            out[site] = update_spread(layer.lora_B, *guide.loc_and_scale(site), scaling=layer.scaling)
    return out


def posterior_trace(guide) -> dict[str, float]:
    """A few numbers that follow q(A) through training (one ``train_log.jsonl`` entry each log step).

    ``mean_abs_A``: the mean |A| over every entry of the guide's sites (``guide.site_names``; A sites left
    deterministic by ``--bayesian-sites`` are not among them) of the point estimate or posterior mean
    (``guide.posterior_mean()``); for a guide with per-site Gaussian marginals (``guide.loc_and_scale``,
    e.g. ``blob``) also ``std_A_min`` / ``std_A_median`` / ``std_A_max`` over every entry. Empty for a guide
    whose ``posterior_mean`` raises ``NotImplementedError`` (e.g. a flow autoguide); any other error of the
    guide propagates (it would fail the N = 0 evaluation too), at the first logged step. It draws no random
    numbers, so a resumed run logs the same values. Read together they show whether the std follows the data
    or only the optimiser's step budget, and whether a prior is pulling A to 0 (Wang et al. 2024, sec. 3.2).
    """
    with torch.no_grad():
        try:
            means = guide.posterior_mean()
        except NotImplementedError:
            return {}
        a = [means[s].detach().flatten().double() for s in guide.site_names if s in means]
        out = {"mean_abs_A": float(torch.cat(a).abs().mean())} if a else {}
        if guide.has_loc_and_scale():
            std = torch.cat([guide.loc_and_scale(s)[1].detach().flatten().double() for s in guide.site_names])
            out.update(std_A_min=float(std.min()), std_A_median=float(std.median()), std_A_max=float(std.max()))
    return out
