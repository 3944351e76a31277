"""Kronecker-factored (KFAC) curvature and Gaussian posterior of the LoRA factors, for Laplace-LoRA with
``--laplace-hessian kfac`` (Martens & Grosse 2015; Ritter et al. 2018; Yang et al. 2024).

Both LoRA factors of an adapter (``update = s * B (A h)``, ``s = alpha / r``, ``h`` the layer input) are
linear maps ``y = W x`` with a weight ``W`` of shape ``(out, in)``:

* ``lora_A`` ``(r, in)``: input ``x = h``, output gradient ``g = dL/d(A h) = s * B^T dL/d(update)``;
* ``lora_B`` ``(out, r)``: input ``x = A h``, output gradient ``g = s * dL/d(update)``.

(A and B both, as the diagonal Laplace of :mod:`.laplace` treats them.) Per weight, the GGN summed over
the data is approximated as ``n * (G ⊗ A)`` in torch's row-major ``W.reshape(-1)`` order (the
``A ⊗ G`` of the column-major ``vec`` in the KFAC literature), with ``n`` examples and

    A = mean over tokens of x x^T                              (in, in)
    G = mean over examples of sum_tokens sum_c p_c g_c g_c^T   (out, out)

where ``g_c`` is the output gradient of ``log p_c``: the GGN of the categorical likelihood (= its Fisher),
with the exact expectation over the model's predictive (K backward passes per example); ``kfac_ef`` (the
empirical Fisher, the observed label only) is available to :func:`kfac_curvature`. Tokens are treated
as independent (the "expand" flavour of Eschenhagen et al. 2023: cross-token terms dropped), padded
tokens (``attention_mask`` 0, where the layer input has the mask's shape) are left out. Exact for one
example of one token. A factor larger than ``max_dense_dim`` (the vocabulary-sized output factor of
``lm_head``'s B: 49,152 x 49,152 for SmolLM2) keeps its diagonal only.

Posterior ``N(W*, (n (G ⊗ A) + lambda I)^-1)``: with ``G = Qg diag(lg) Qg^T``, ``A = Qa diag(la) Qa^T``
its covariance is ``(Qg ⊗ Qa) diag(1 / (n lg_i la_j + lambda)) (Qg ⊗ Qa)^T``, so a draw is
``W* + Qg (E ∘ S) Qa^T`` with ``E ~ N(0, I)`` and ``S_ij = (n lg_i la_j + lambda)^(-1/2)``, both ``(out, in)``,
and the log-determinant in the evidence is ``sum_ij log(n lg_i la_j + lambda)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import pyro
import torch
from torch import nn

from blob_pyro.guides.fixed import FixedGaussianGuide

__all__ = [
    "MAX_DENSE_DIM", "KroneckerFactor", "KroneckerCurvature", "KroneckerPosterior", "KroneckerGaussianGuide",
    "kfac_curvature",
]

MAX_DENSE_DIM = 4096  # larger factors keep their diagonal (a dense 4096^2 float64 factor is 128 MiB)


@dataclass
class KroneckerFactor:
    """A symmetric PSD factor in eigen form ``Q diag(values) Q^T``.

    ``values``: ``(d,)``, >= 0. ``vectors``: ``(d, d)`` with orthonormal columns, or ``None`` for the
    identity (a diagonal factor).
    """

    values: torch.Tensor
    vectors: Optional[torch.Tensor]

    @classmethod
    def of(cls, matrix: torch.Tensor) -> "KroneckerFactor":
        """Eigendecompose a ``(d, d)`` factor; a ``(d,)`` tensor is a diagonal factor. Eigenvalues are
        clipped at 0 (round-off)."""
        matrix = matrix.double()
        if matrix.dim() == 1:
            return cls(matrix.clamp(min=0.0), None)
        values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
        return cls(values.clamp(min=0.0), vectors)

    @property
    def dim(self) -> int:
        return self.values.numel()

    def dense(self) -> torch.Tensor:
        """The factor as a ``(d, d)`` matrix."""
        if self.vectors is None:
            return torch.diag(self.values)
        return (self.vectors * self.values) @ self.vectors.T


@dataclass
class KroneckerCurvature:
    """The curvature ``num_data * (G ⊗ A)`` of one ``(out, in)`` weight, row-major order.

    ``G``: output factor (``out``), ``A``: input factor (``in``); both per example (G) / per token (A)
    means, so that ``num_data`` examples give the curvature of a data set of that size.
    """

    G: KroneckerFactor
    A: KroneckerFactor
    num_data: float

    @property
    def shape(self) -> tuple:
        return (self.G.dim, self.A.dim)

    def with_num_data(self, num_data: float) -> "KroneckerCurvature":
        """The same factors scaled to a data set of ``num_data`` examples."""
        return dataclasses.replace(self, num_data=float(num_data))

    def eigenvalues(self) -> torch.Tensor:
        """``(out, in)``: ``num_data * lg_i * la_j``, the eigenvalue of the eigenvector ``Qg[:, i] ⊗ Qa[:, j]``."""
        return self.num_data * self.G.values[:, None] * self.A.values[None, :]

    def dense(self) -> torch.Tensor:
        """``(out * in, out * in)``: ``num_data * kron(G, A)``, matching ``W.reshape(-1)`` (small weights only)."""
        return self.num_data * torch.kron(self.G.dense(), self.A.dense())

    def to_eigenbasis(self, M: torch.Tensor) -> torch.Tensor:
        """``Qg^T M Qa`` for ``M`` ``(out, in)``: coordinates in the eigenbasis."""
        M = M.double()
        if self.G.vectors is not None:
            M = self.G.vectors.T @ M
        if self.A.vectors is not None:
            M = M @ self.A.vectors
        return M

    def from_eigenbasis(self, M: torch.Tensor) -> torch.Tensor:
        """``Qg M Qa^T`` for ``M`` ``(out, in)``: the inverse of :meth:`to_eigenbasis`."""
        M = M.double()
        if self.G.vectors is not None:
            M = self.G.vectors @ M
        if self.A.vectors is not None:
            M = M @ self.A.vectors.T
        return M


class KroneckerPosterior:
    """``N(loc, (curvature + prior_precision I)^-1)`` of one ``(out, in)`` weight.

    :param loc: the MAP weight ``(out, in)``; draws have its dtype and device.
    """

    def __init__(self, loc: torch.Tensor, curvature: KroneckerCurvature, prior_precision: float):
        if tuple(loc.shape) != curvature.shape:
            raise ValueError(f"weight of shape {tuple(loc.shape)} does not match Kronecker factors of shape {curvature.shape}")
        if not prior_precision > 0:
            raise ValueError(f"the prior precision must be positive, got {prior_precision}")
        self.loc = loc.detach()
        self.curvature = curvature
        self.prior_precision = float(prior_precision)
        self.scale = (curvature.eigenvalues() + self.prior_precision).rsqrt()  # (out, in), eigenbasis std

    def sample(self) -> torch.Tensor:
        """One draw ``loc + Qg (E ∘ S) Qa^T``, ``(out, in)``."""
        noise = torch.randn(self.scale.shape, dtype=self.scale.dtype, device=self.scale.device) * self.scale
        return (self.loc.double() + self.curvature.from_eigenbasis(noise)).to(self.loc.dtype)

    def marginal_std(self) -> torch.Tensor:
        """Marginal standard deviations ``(out, in)``: ``sqrt(Qg^2 S^2 (Qa^2)^T)``."""
        var = self.scale**2
        G, A = self.curvature.G.vectors, self.curvature.A.vectors
        if G is not None:
            var = G**2 @ var
        if A is not None:
            var = var @ (A**2).T
        return var.sqrt()

    def quadratic_form(self, grad: torch.Tensor) -> torch.Tensor:
        """``vec(grad)^T Sigma vec(grad)`` for ``grad`` ``(out, in)`` (the variance of a linearised output)."""
        return ((self.curvature.to_eigenbasis(grad) * self.scale) ** 2).sum()

    def covariance(self) -> torch.Tensor:
        """``(out * in, out * in)`` covariance in ``W.reshape(-1)`` order (small weights only, for tests)."""
        n = self.curvature.G.dim * self.curvature.A.dim
        precision = self.curvature.dense() + self.prior_precision * torch.eye(n, dtype=torch.float64, device=self.scale.device)
        return torch.linalg.inv(precision)


class KroneckerGaussianGuide(FixedGaussianGuide):
    """A non-trainable guide drawing every site from its :class:`KroneckerPosterior`.

    A drop-in for :class:`FixedGaussianGuide` in :mod:`blob_pyro.evaluation.predictive`: ``forward``
    samples every site (a ``Delta`` at a correlated Gaussian draw; only the values matter for prediction),
    ``posterior_mean()`` returns the MAP weights, ``scales`` the marginal standard deviations.

    :param posteriors: ``{site: KroneckerPosterior}``; sites ``<path>.lora_B`` make B Bayesian.
    """

    def __init__(self, model, posteriors: dict):
        locs = {site: p.loc for site, p in posteriors.items()}
        scales = {site: p.marginal_std().to(p.loc.dtype) for site, p in posteriors.items()}
        super().__init__(model, locs, scales)
        self.posteriors = dict(posteriors)

    def forward(self, *args, **kwargs):
        import pyro.distributions as dist

        return {site: pyro.sample(site, dist.Delta(p.sample(), event_dim=p.loc.dim())) for site, p in self.posteriors.items()}


# --- collecting the factors -------------------------------------------------------------------------------


class _OuterProductSum:
    """Running ``sum_rows w x x^T`` of ``(m, d)`` rows: ``(d, d)``, or its diagonal ``(d,)`` if ``d > max_dense_dim``."""

    def __init__(self, dim: int, max_dense_dim: int, device):
        shape = (dim, dim) if dim <= max_dense_dim else (dim,)
        self.total = torch.zeros(shape, dtype=torch.float64, device=device)

    def add(self, rows: torch.Tensor, weights: torch.Tensor) -> None:
        """``rows`` ``(m, d)``, ``weights`` ``(m,)``."""
        if self.total.dim() == 1:
            self.total.add_((weights[:, None] * rows**2).sum(0))
        else:
            self.total.add_((weights[:, None] * rows).T @ rows)


@dataclass
class _AdapterCall:
    """One call of an adapter: input ``x`` ``(..., in)``, output ``y`` ``(..., out)``, factors A ``(r, in)``, B ``(out, r)``."""

    x: torch.Tensor
    y: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor


class _AdapterRecorder:
    """Forward hooks on LoRA adapters recording every call (``with _AdapterRecorder(layers) as rec``)."""

    def __init__(self, layers: dict):
        self.layers = layers
        self.calls = {name: [] for name in layers}
        self._handles = []

    def __enter__(self):
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        for calls in self.calls.values():
            calls.clear()

    def _hook(self, name: str):
        def hook(layer, inputs, output):
            if layer.active_A is None or layer.active_B is None:
                raise RuntimeError(f"{name}: no LoRA factors set for this pass; compute logits with model.class_logits")
            if layer.flipout is not None:
                raise ValueError(f"{name}: KFAC curvature needs a pass without flipout")
            dropout = layer._modules["lora_dropout"]
            if not isinstance(dropout, nn.Identity) and dropout.training:
                raise ValueError(f"{name}: KFAC curvature needs LoRA dropout off; call model.eval() first")
            self.calls[name].append(_AdapterCall(inputs[0], output, layer.active_A, layer.active_B))

        return hook


def _token_weights(x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(m,)`` weights of the ``m`` tokens of an input ``(..., d)``: the attention mask where it has the
    input's leading shape (padded tokens weigh 0), else ones (e.g. ``lm_head`` on the last positions only)."""
    lead = tuple(x.shape[:-1])
    if attention_mask is not None and tuple(attention_mask.shape) == lead:
        return attention_mask.reshape(-1).to(device=x.device, dtype=torch.float64)
    return torch.ones(math.prod(lead), dtype=torch.float64, device=x.device)


def _label_terms(log_probs: torch.Tensor, label: int, kind: str) -> list:
    """``[(class, weight)]`` of the outer products: every class weighted by ``p_c`` (GGN), or the label (EF)."""
    if kind == "kfac_ef":
        return [(label, 1.0)]
    return [(c, float(log_probs[c].detach().exp())) for c in range(log_probs.numel())]


def kfac_curvature(logits_fn: Callable[[dict], torch.Tensor], layers: dict, examples: Iterable[dict], *,
                   kind: str = "kfac", max_dense_dim: int = MAX_DENSE_DIM) -> dict[str, KroneckerCurvature]:
    """KFAC GGN (``kind="kfac"``) or empirical Fisher (``"kfac_ef"``) of the A and B factors of ``layers``.

    :param logits_fn: one example (a batch of size 1 with ``labels``, optionally ``attention_mask``) ->
        ``(1, K)`` logits, computed through the adapters with factors that require grad.
    :param layers: ``{A site name: BayesianLoRALinear}`` (e.g. ``model.adapters``), in eval mode.
    :returns: ``{A site name: curvature of A (r, in), layer.site_name_B: curvature of B (out, r)}`` with
        ``num_data`` the number of examples seen (rescale with :meth:`KroneckerCurvature.with_num_data`).
    """
    if kind not in ("kfac", "kfac_ef"):
        raise ValueError(f"KFAC curvature kind must be 'kfac' or 'kfac_ef', got {kind!r}")
    sums, tokens, num_examples = {}, {}, 0
    with _AdapterRecorder(layers) as recorder:
        for example in examples:
            recorder.clear()
            log_probs = torch.log_softmax(logits_fn(example).double(), -1)[0]
            calls = [(name, call) for name, layer_calls in recorder.calls.items() for call in layer_calls]
            weights = []
            for name, call in calls:
                pair = _factor_sums(sums, name, layers[name], call, max_dense_dim)
                w = _token_weights(call.x, example.get("attention_mask"))
                h = call.x.detach().to(call.B.dtype).double().reshape(-1, call.x.shape[-1])
                pair["A"][0].add(h, w)
                pair["B"][0].add(h @ call.A.detach().double().T, w)
                tokens[name] = tokens.get(name, 0.0) + float(w.sum())
                weights.append(w)
            terms = _label_terms(log_probs, int(example["labels"][0]), kind)
            for index, (c, p) in enumerate(terms):
                grads = torch.autograd.grad(log_probs[c], [call.y for _, call in calls],
                                            retain_graph=index < len(terms) - 1, allow_unused=True)
                for (name, call), w, g in zip(calls, weights, grads):
                    if g is None:
                        continue
                    g_B = layers[name].scaling * g.double().reshape(-1, g.shape[-1])  # (tokens, out)
                    sums[name]["B"][1].add(g_B, p * w)
                    sums[name]["A"][1].add(g_B @ call.B.detach().double(), p * w)   # (tokens, r)
            num_examples += 1
    if num_examples == 0:
        raise ValueError("no examples to compute the KFAC curvature on; pass a non-empty iterable")
    return _finish(sums, tokens, layers, num_examples)


def _factor_sums(sums: dict, name: str, layer, call: _AdapterCall, max_dense_dim: int) -> dict:
    """``sums[name]``: ``{"A": (input sum, output sum), "B": (...)}``, created at the first call."""
    if name not in sums:
        r, d_in = call.A.shape
        d_out = call.B.shape[0]
        device = call.x.device
        sums[name] = {
            "A": (_OuterProductSum(d_in, max_dense_dim, device), _OuterProductSum(r, max_dense_dim, device)),
            "B": (_OuterProductSum(r, max_dense_dim, device), _OuterProductSum(d_out, max_dense_dim, device)),
        }
    return sums[name]


def _finish(sums: dict, tokens: dict, layers: dict, num_examples: int) -> dict:
    """Normalise the sums (input factors per token, output factors per example) and eigendecompose."""
    result = {}
    for name, layer in layers.items():
        if name not in sums:
            raise ValueError(f"adapter {name} was never called by logits_fn; KFAC needs every adapter in the forward pass")
        if tokens[name] == 0:
            raise ValueError(f"adapter {name} saw only padded tokens; check the examples' attention_mask")
        for key, site in (("A", name), ("B", layer.site_name_B)):
            inputs, outputs = sums[name][key]
            result[site] = KroneckerCurvature(G=KroneckerFactor.of(outputs.total / num_examples),
                                              A=KroneckerFactor.of(inputs.total / tokens[name]),
                                              num_data=float(num_examples))
    return result
