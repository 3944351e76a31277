"""Posterior and posterior-predictive draws as an ArviZ ``InferenceData``, saved as NetCDF.

:func:`blob_pyro.evaluation.predictive.draw_predictive` (the sampler train, evaluate and the baselines
share) samples the posterior predictive draw by draw: draw ``s`` samples every LoRA-A once from the guide
and uses that one draw for every evaluation batch, so a draw is one coherent network (its A factors, its
class probabilities and its log-likelihoods belong together). Each draw is seeded from ``(seed, s)``, so
two calls with the same seed (e.g. one per task) use the same S networks, and memory stays bounded: one
set of A factors at a time, plus the ``(S, n, K)`` probabilities and the A draws of the sites asked for.

:func:`build_inference_data` arranges the draws as an ``InferenceData`` (one chain of S draws):

* ``posterior``: draws of LoRA-A for the chosen sites, one variable per site named by its Pyro site
  (``model.layers.0.self_attn.q_proj.lora_A``), dims ``(chain, draw, lora_rank, in_features_<d>)``
  (a guide that makes B random adds its ``lora_B`` sites, dims ``(..., out_features_<d>, lora_rank)``);
* ``posterior_predictive`` (the evaluated, held-out examples): ``probs`` ``(chain, draw, example, class)``,
  the sampled labels ``y`` ``(chain, draw, example)`` and ``held_out_log_likelihood``
  ``(chain, draw, example)`` = ``log probs[y_i]`` of each draw;
* ``observed_data``: ``y`` ``(example,)``, the gold labels of the held-out examples, and, when training
  examples are given, ``y_train`` ``(train_example,)``;
* ``log_likelihood``: ``y_train`` ``(chain, draw, train_example)``, the pointwise log-likelihood of a
  subsample of the TRAINING examples the posterior was fitted to. PSIS-LOO and WAIC (``az.loo``,
  ``az.waic``) estimate the predictive density of left-out *training* points from the posterior
  conditioned on all of them (Vehtari, Gelman & Gabry 2017), so only training points belong here; a file
  built without training examples has no ``log_likelihood`` group;
* ``attrs`` (file level and on every group): run metadata (model, task, guide, prior, seed, versions) and
  ``held_out_lpd``, the held-out log predictive density ``sum_i log mean_s p(y_i | theta_s)``
  (:func:`held_out_lpd`; = ``-n * NLL`` of the averaged predictive), with ``held_out_n``.

The draws are independent samples from a variational posterior, not a Markov chain: R-hat and ESS
(``az.rhat``, ``az.ess``, ``az.summary``'s diagnostics columns) are meaningless for them and are not
diagnostics of the fit. PSIS-LOO's Pareto k values say how far the variational posterior is from
the leave-one-out posteriors; with few draws (S < ~100) they are noisy.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "RHAT_ESS_NOTE",
    "choose_posterior_sites",
    "build_inference_data",
    "held_out_lpd",
    "save_inference_data",
    "load_inference_data",
    "import_arviz",
]

RHAT_ESS_NOTE = (
    "Draws are independent samples from a variational posterior (one chain): R-hat and ESS are "
    "meaningless for them and are not convergence diagnostics."
)


def import_arviz():
    """``import arviz``, without the FutureWarning about its 1.x refactor that 0.23 prints on import."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
        import arviz

    return arviz


def choose_posterior_sites(site_names: Sequence[str], spec: str) -> list[str]:
    """The guide sample sites named by ``spec``, in ``site_names`` order (for the ``posterior`` group).

    ``spec`` is ``"all"``, ``"none"`` (or empty), ``"re:<regex>"`` (full match on the site name) or a
    comma-separated list of site names or dotted suffixes (``"q_proj"`` or ``"q_proj.lora_A"`` selects
    every ``...q_proj.lora_A``).
    """
    spec = (spec or "").strip()
    if spec in ("", "none"):
        return []
    if spec == "all":
        return list(site_names)
    if spec.startswith("re:"):
        try:
            pattern = re.compile(spec[3:])
        except re.error as err:
            raise ValueError(f"posterior sites {spec!r}: invalid regular expression ({err})") from err
        chosen = [s for s in site_names if pattern.fullmatch(s)]
    else:
        wanted = [w.strip() for w in spec.split(",") if w.strip()]
        chosen = []
        for site in site_names:
            stem = site[: -len(".lora_A")] if site.endswith(".lora_A") else site
            if any(site == w or stem == w or site.endswith("." + w) or stem.endswith("." + w) for w in wanted):
                chosen.append(site)
    if not chosen:
        examples = ", ".join(list(site_names)[:3])
        raise ValueError(
            f"posterior sites {spec!r} match none of the {len(site_names)} LoRA-A sites (e.g. {examples}); "
            "pass 'all', 'none', a comma-separated list of names or suffixes such as 'q_proj', or 're:<regex>'"
        )
    return chosen


def _site_dims(site: str, shape: tuple) -> list[str]:
    """Named dims of a LoRA factor: A ``(rank, in_features)``, B ``(out_features, rank)``."""
    if site.endswith("lora_A"):
        return ["lora_rank", f"in_features_{shape[1]}"]
    if site.endswith("lora_B"):
        return [f"out_features_{shape[0]}", "lora_rank"]
    return [f"dim_{i}_{size}" for i, size in enumerate(shape)]


def _attr_value(value):
    """NetCDF attributes must be strings or numbers: JSON-encode the rest, drop None."""
    if isinstance(value, (str, int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def held_out_lpd(probs, labels, *, eps: float = 1e-12) -> float:
    """Held-out log predictive density ``sum_i log mean_s p_s(y_i)`` of ``(S, n, K)`` draws and ``(n,)`` labels.

    The averaged predictive probability is floored at ``eps`` as in ``negative_log_likelihood``, so this is
    exactly ``-n * NLL`` of ``probs.mean(0)`` (Gelman, Hwang & Vehtari 2014, "lpd" of new data).
    """
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels).astype(np.int64)
    if p.ndim != 3 or y.shape != (p.shape[1],):
        raise ValueError(f"expected probs (S, n, K) and labels (n,); got shapes {p.shape} and {y.shape}")
    return float(np.sum(np.log(np.maximum(p.mean(0)[np.arange(y.size), y], eps))))


def _pointwise_log_lik(p: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    """``(S, n)`` = ``log p[s, i, y_i]``, floored at ``eps``."""
    return np.log(np.maximum(p[:, np.arange(y.size), y], eps))


def _check_labels(y, n: int, k: int, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the probabilities; got shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"{name} must lie in [0, {k}); found values in [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def build_inference_data(
    probs,
    labels,
    *,
    sampled_labels=None,
    posterior: Optional[Mapping[str, np.ndarray]] = None,
    class_names: Optional[Sequence[str]] = None,
    example_ids: Optional[Sequence[int]] = None,
    train_probs=None,
    train_labels=None,
    train_example_ids: Optional[Sequence[int]] = None,
    attrs: Optional[Mapping] = None,
    eps: float = 1e-12,
):
    """An ``arviz.InferenceData`` with one chain of S independent variational draws.

    Args:
        probs: ``(S, n, K)`` class probabilities per draw on the evaluated (held-out) examples.
        labels: ``(n,)`` their gold labels (observed data).
        sampled_labels: ``(S, n)`` labels sampled from each draw (posterior predictive ``y``); omitted
            from the group if None.
        posterior: ``{site: (S, rank, in_features)}`` draws of A; no ``posterior`` group if empty.
        class_names: K names for the ``class`` coordinate (default ``0..K-1``).
        example_ids: n ids for the ``example`` coordinate (e.g. positions in the task file).
        train_probs: ``(S, m, K_train)`` class probabilities of the same S draws on m TRAINING examples (the
            data the posterior was fitted to; K_train may differ from K for an OOD task); they make the ``log_likelihood`` group (for ``az.loo``/``az.waic``).
            None: no ``log_likelihood`` group.
        train_labels: ``(m,)`` their gold labels. train_example_ids: m ids (``train_example`` coordinate).
        attrs: run metadata; non-scalar values are stored as JSON strings.
        eps: floor of the probabilities in the log-likelihoods (as in ``negative_log_likelihood``).

    Returns:
        ``InferenceData`` with groups ``posterior`` (if given), ``posterior_predictive``,
        ``log_likelihood`` (training examples, if given), ``observed_data``; attrs ``held_out_lpd``,
        ``held_out_n``. R-hat and ESS are meaningless for these draws (:data:`RHAT_ESS_NOTE`).
    """
    az = import_arviz()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"probs must have shape (S, n, K); got shape {p.shape}")
    num_draws, n, k = p.shape
    y = _check_labels(labels, n, k, "labels")
    class_names = list(class_names) if class_names is not None else list(range(k))
    if len(class_names) != k:
        raise ValueError(f"class_names has {len(class_names)} entries for {k} classes")
    example_ids = np.asarray(example_ids if example_ids is not None else np.arange(n))
    if example_ids.shape != (n,):
        raise ValueError(f"example_ids must have shape ({n},); got shape {example_ids.shape}")

    predictive = {"probs": p[None], "held_out_log_likelihood": _pointwise_log_lik(p, y, eps)[None]}
    dims = {"probs": ["example", "class"], "y": ["example"], "held_out_log_likelihood": ["example"],
            "y_train": ["train_example"]}
    observed = {"y": y}
    log_likelihood = None
    if train_probs is not None:
        tp = np.asarray(train_probs, dtype=np.float64)
        if tp.ndim != 3 or tp.shape[0] != num_draws:
            raise ValueError(f"train_probs must have shape ({num_draws}, m, K_train) (the same {num_draws} draws); got shape {tp.shape}")
        ty = _check_labels(train_labels, tp.shape[1], tp.shape[2], "train_labels")
        log_likelihood = {"y_train": _pointwise_log_lik(tp, ty, eps)[None]}
        observed["y_train"] = ty
    elif train_labels is not None:
        raise ValueError("train_labels given without train_probs: pass both (or neither)")
    if sampled_labels is not None:
        sampled = np.asarray(sampled_labels)
        if sampled.shape != (num_draws, n):
            raise ValueError(f"sampled_labels must have shape ({num_draws}, {n}); got shape {sampled.shape}")
        predictive["y"] = sampled.astype(np.int64)[None]
    coords = {"example": example_ids, "class": class_names}
    if log_likelihood is not None:
        m = len(observed["y_train"])
        train_ids = np.asarray(train_example_ids if train_example_ids is not None else np.arange(m))
        if train_ids.shape != (m,):
            raise ValueError(f"train_example_ids must have shape ({m},); got shape {train_ids.shape}")
        coords["train_example"] = train_ids
    draws_of_A = {}
    for site, values in (posterior or {}).items():
        values = np.asarray(values)
        if values.ndim != 3 or values.shape[0] != num_draws:
            raise ValueError(f"posterior draws of {site} must have shape ({num_draws}, rows, columns); got {values.shape}")
        draws_of_A[site] = values[None]
        dims[site] = _site_dims(site, values.shape[1:])
    metadata = {"inference_library": "pyro", "draws": "independent variational draws (one chain)",
                "note": RHAT_ESS_NOTE, "held_out_lpd": held_out_lpd(p, y, eps=eps), "held_out_n": int(n),
                "log_likelihood_data": "training examples (PSIS-LOO / WAIC)" if log_likelihood is not None else "none",
                **(attrs or {})}
    metadata = {key: _attr_value(value) for key, value in metadata.items() if value is not None}
    idata = az.from_dict(
        posterior=draws_of_A or None,
        posterior_predictive=predictive,
        log_likelihood=log_likelihood,
        observed_data=observed,
        coords=coords,
        dims=dims,
        attrs=metadata,
    )
    for group in idata.groups():
        idata[group].attrs.update(metadata)
    return idata


def save_inference_data(idata, path) -> Path:
    """Write ``idata`` to NetCDF (engine h5netcdf, compressed); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    idata.to_netcdf(str(tmp), engine="h5netcdf")
    tmp.replace(path)  # an interrupted write never leaves a half-written file under the final name
    return path


def load_inference_data(path):
    """Reopen a file written by :func:`save_inference_data` (``arviz.from_netcdf``)."""
    az = import_arviz()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run python -m blob_pyro.evaluate to write it")
    return az.from_netcdf(str(path), engine="h5netcdf")
