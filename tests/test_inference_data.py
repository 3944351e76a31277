"""InferenceData from Predictive draws: layout against hand-built arrays, NetCDF round trip, draw coherence."""

import json
import warnings

import numpy as np
import pytest
import torch
from pyro import poutine

from blob_pyro.evaluation.inference_data import (
    RHAT_ESS_NOTE, build_inference_data, choose_posterior_sites, held_out_lpd, load_inference_data, save_inference_data,
)
from blob_pyro.evaluation.predictive import draw_predictive, guide_sample_sites
from blob_pyro.evaluation.metrics import classification_metrics
from blob_pyro.guides import make_guide

from helpers import synthetic_batch, tiny_bayesian_llama

warnings.filterwarnings("ignore", category=FutureWarning)  # arviz 0.23's refactor notice


# Two draws, three examples, two classes; labels [0, 1, 1].
PROBS = np.array([
    [[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]],
    [[0.7, 0.3], [0.4, 0.6], [0.5, 0.5]],
])
LABELS = np.array([0, 1, 1])
SAMPLED = np.array([[0, 1, 0], [0, 0, 1]])
A_DRAWS = {"model.layers.0.q_proj.lora_A": np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)}


TRAIN_PROBS = np.array([  # (S=2, m=2, K=2): the same two draws on two training examples
    [[0.2, 0.8], [0.6, 0.4]],
    [[0.3, 0.7], [0.9, 0.1]],
])
TRAIN_LABELS = np.array([1, 0])


def test_groups_dims_and_log_likelihood_by_hand():
    idata = build_inference_data(PROBS, LABELS, sampled_labels=SAMPLED, posterior=A_DRAWS, class_names=["A", "B"],
                                 example_ids=[10, 11, 12], train_probs=TRAIN_PROBS, train_labels=TRAIN_LABELS,
                                 train_example_ids=[4, 7], attrs={"model": "tiny", "versions": {"torch": "x"}, "skip": None})
    assert set(idata.groups()) == {"posterior", "posterior_predictive", "log_likelihood", "observed_data"}
    # log_likelihood: the TRAINING examples (what PSIS-LOO / WAIC condition on), by hand
    train_ll = idata.log_likelihood["y_train"]
    assert train_ll.dims == ("chain", "draw", "train_example") and list(train_ll["train_example"].values) == [4, 7]
    np.testing.assert_allclose(train_ll.values[0], np.log([[0.8, 0.6], [0.7, 0.9]]))
    np.testing.assert_array_equal(idata.observed_data["y_train"].values, TRAIN_LABELS)
    assert list(idata.log_likelihood.data_vars) == ["y_train"]
    probs = idata.posterior_predictive["probs"]
    assert probs.dims == ("chain", "draw", "example", "class")
    assert probs.shape == (1, 2, 3, 2)
    assert list(idata.posterior_predictive["class"].values) == ["A", "B"]
    assert list(idata.observed_data["example"].values) == [10, 11, 12]
    np.testing.assert_array_equal(idata.observed_data["y"].values, LABELS)
    np.testing.assert_array_equal(idata.posterior_predictive["y"].values[0], SAMPLED)
    # held out: log p(y_i | draw s) in posterior_predictive, and lpd = sum_i log mean_s p(y_i | draw s), by hand
    expected = np.log([[0.9, 0.8, 0.5], [0.7, 0.6, 0.5]])
    np.testing.assert_allclose(idata.posterior_predictive["held_out_log_likelihood"].values[0], expected)
    assert idata.attrs["held_out_lpd"] == pytest.approx(np.log(0.8) + np.log(0.7) + np.log(0.5))
    assert idata.attrs["held_out_n"] == 3
    a = idata.posterior["model.layers.0.q_proj.lora_A"]
    assert a.dims == ("chain", "draw", "lora_rank", "in_features_3")
    np.testing.assert_array_equal(a.values[0], A_DRAWS["model.layers.0.q_proj.lora_A"])
    # metadata on the file and on every group; dicts as JSON, None dropped; the R-hat/ESS caveat recorded
    for attrs in [idata.attrs] + [idata[g].attrs for g in idata.groups()]:
        assert attrs["model"] == "tiny"
        assert json.loads(attrs["versions"]) == {"torch": "x"}
        assert "skip" not in attrs
        assert attrs["note"] == RHAT_ESS_NOTE
    assert "meaningless" in RHAT_ESS_NOTE


def test_no_posterior_or_log_likelihood_group_without_draws_of_A_or_training_examples():
    idata = build_inference_data(PROBS, LABELS)
    assert "posterior" not in idata.groups()
    assert "log_likelihood" not in idata.groups()  # held-out points never stand in for LOO's data
    assert "y" not in idata.posterior_predictive  # no sampled labels given
    assert idata.attrs["log_likelihood_data"] == "none"


def test_log_likelihoods_floor_zero_probabilities():
    probs = np.array([[[1.0, 0.0]]])
    idata = build_inference_data(probs, np.array([1]), train_probs=probs, train_labels=np.array([1]))
    assert idata.log_likelihood["y_train"].values.item() == pytest.approx(np.log(1e-12))
    assert idata.posterior_predictive["held_out_log_likelihood"].values.item() == pytest.approx(np.log(1e-12))


def test_held_out_lpd_is_minus_n_times_the_nll_of_the_averaged_predictive():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=(7, 30))
    probs[:, 0] = [1.0, 0.0, 0.0, 0.0]  # an example every draw gets wrong: the eps floor must agree too
    labels = rng.integers(0, 4, size=30)
    labels[0] = 3
    nll = classification_metrics(probs.mean(0), labels)["nll"]
    assert held_out_lpd(probs, labels) == pytest.approx(-30 * nll, rel=1e-12)
    assert build_inference_data(probs, labels).attrs["held_out_lpd"] == pytest.approx(-30 * nll, rel=1e-12)
    # not the mean over draws of the log-likelihood (what a pointwise log_likelihood group would sum to)
    per_draw = np.log(np.maximum(probs[:, np.arange(30), labels], 1e-12)).mean(0).sum()
    assert held_out_lpd(probs, labels) > per_draw


@pytest.mark.parametrize(
    "probs, labels, kwargs, match",
    [
        (PROBS[0], LABELS, {}, r"probs must have shape \(S, n, K\); got shape \(3, 2\)"),
        (PROBS, LABELS[:2], {}, r"labels must have shape \(3,\) to match the probabilities"),
        (PROBS, LABELS, {"train_probs": TRAIN_PROBS[:1], "train_labels": TRAIN_LABELS}, r"train_probs must have shape \(2, m, K_train\)"),
        (PROBS, LABELS, {"train_probs": TRAIN_PROBS, "train_labels": LABELS}, r"train_labels must have shape \(2,\)"),
        (PROBS, LABELS, {"train_labels": TRAIN_LABELS}, r"train_labels given without train_probs"),
        (PROBS, np.array([0, 2, 1]), {}, r"labels must lie in \[0, 2\); found values in \[0, 2\]"),
        (PROBS, LABELS, {"sampled_labels": SAMPLED[:1]}, r"sampled_labels must have shape \(2, 3\)"),
        (PROBS, LABELS, {"class_names": ["A"]}, r"class_names has 1 entries for 2 classes"),
        (PROBS, LABELS, {"posterior": {"s.lora_A": np.zeros((3, 2, 2))}}, r"posterior draws of s.lora_A must have shape \(2, rows, columns\)"),
    ],
)
def test_bad_inputs_say_what_was_expected(probs, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_inference_data(probs, labels, **kwargs)


def test_netcdf_round_trip_reopens_with_arviz(tmp_path):
    import arviz as az

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(40, 12))  # 40 draws so that az.loo has something to work with
    labels = rng.integers(0, 3, size=12)
    idata = build_inference_data(probs, labels, sampled_labels=rng.integers(0, 3, size=(40, 12)),
                                 posterior={"lm_head.lora_A": rng.normal(size=(40, 2, 4)).astype(np.float32)},
                                 train_probs=rng.dirichlet(np.ones(3), size=(40, 20)), train_labels=rng.integers(0, 3, size=20),
                                 class_names=["A", "B", "C"], attrs={"task": "t", "seed": 3})
    path = save_inference_data(idata, tmp_path / "sub" / "idata.nc")
    assert path.exists() and not path.with_suffix(".nc.tmp").exists()

    again = az.from_netcdf(str(path))
    assert set(again.groups()) == set(idata.groups())
    for group in idata.groups():
        for name, values in idata[group].data_vars.items():
            np.testing.assert_array_equal(again[group][name].values, values.values)
            assert again[group][name].dims == values.dims
    assert again.attrs["task"] == "t" and again.attrs["seed"] == 3
    assert again.posterior_predictive.attrs["inference_library"] == "pyro"
    # the log_likelihood group is what az.loo / az.waic need
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(again)
        waic = az.waic(again)
    ll = idata.log_likelihood["y_train"].values[0]  # (S, m): training examples
    assert loo.n_data_points == 20 and waic.n_data_points == 20
    lppd = np.sum(np.log(np.mean(np.exp(ll), axis=0)))
    p_waic = np.sum(np.var(ll, axis=0))  # arviz uses the ddof = 0 variance
    assert waic.elpd_waic == pytest.approx(lppd - p_waic, rel=1e-6)
    assert np.isfinite(loo.elpd_loo)
    assert load_inference_data(path).posterior["lm_head.lora_A"].shape == (1, 40, 2, 4)


def test_load_missing_file_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m blob_pyro.evaluate"):
        load_inference_data(tmp_path / "nope.nc")


SITES = ["model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.v_proj.lora_A", "lm_head.lora_A"]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", SITES),
        ("none", []),
        ("", []),
        ("q_proj", SITES[:1]),
        ("lm_head,v_proj.lora_A", SITES[1:]),
        ("lm_head.lora_A", SITES[2:]),
        ("re:.*self_attn.*", SITES[:2]),
    ],
)
def test_choose_posterior_sites(spec, expected):
    assert choose_posterior_sites(SITES, spec) == expected


def test_choose_posterior_sites_unknown_name_lists_sites():
    with pytest.raises(ValueError, match=r"match none of the 3 LoRA-A sites \(e.g. model.layers.0.self_attn.q_proj.lora_A"):
        choose_posterior_sites(SITES, "k_proj")
    with pytest.raises(ValueError, match="invalid regular expression"):
        choose_posterior_sites(SITES, "re:(")


# --- draws from a tiny Bayesian Llama ----------------------------------------------------------------


def _batches(batch, size):
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


@pytest.fixture
def blob_model():
    model = tiny_bayesian_llama().eval()
    with torch.no_grad():  # B = 0 at initialisation would make every draw of A give the base model
        for layer in model.adapters.values():
            layer._parameters["lora_B"].normal_(0.0, 1.0)
    guide = make_guide("blob", model, eps=0.3)  # a wide posterior, so draws differ visibly
    return model, guide


def test_draws_are_coherent_networks_across_batches(blob_model):
    model, guide = blob_model
    batch = synthetic_batch(n=10)
    sites = guide.site_names
    small = draw_predictive(model, guide, _batches(batch, 3), num_samples=3, seed=5, posterior_sites=sites)
    whole = draw_predictive(model, guide, _batches(batch, 10), num_samples=3, seed=5)
    assert small.probs.shape == (3, 10, 3) and small.sampled_labels.shape == (3, 10)
    assert {s: v.shape for s, v in small.posterior.items()} == {s: (3, 2, 16) for s in sites}
    # One draw of A serves every batch: batching does not change a draw's probabilities.
    np.testing.assert_allclose(small.probs, whole.probs, atol=1e-5)
    # Draw s's probabilities are those of the network with A = the recorded draw s.
    for s in range(3):
        draw = {site: torch.as_tensor(small.posterior[site][s]) for site in sites}
        with poutine.block(), poutine.condition(data=draw):
            logits = model.class_logits(batch["input_ids"], batch["attention_mask"])
        np.testing.assert_allclose(small.probs[s], torch.softmax(logits, -1).detach().numpy(), atol=1e-5)
    assert not np.allclose(small.probs[0], small.probs[1])  # the draws differ
    assert small.sampled_labels.min() >= 0 and small.sampled_labels.max() < 3


def test_draws_are_seeded_and_leave_the_global_rng_alone(blob_model):
    model, guide = blob_model
    batches = _batches(synthetic_batch(n=6), 6)
    state = torch.get_rng_state()
    first = draw_predictive(model, guide, batches, num_samples=2, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(first.probs, draw_predictive(model, guide, batches, num_samples=2, seed=1).probs)
    assert not np.allclose(first.probs, draw_predictive(model, guide, batches, num_samples=2, seed=2).probs)
    # draw s of a 3-draw call is draw s of a 2-draw call: tasks evaluated with the same seed share draws
    np.testing.assert_array_equal(draw_predictive(model, guide, batches, num_samples=3, seed=1).probs[:2], first.probs)


def test_point_estimate_draws_all_agree():
    model = tiny_bayesian_llama().eval()
    guide = make_guide("mle", model)
    out = draw_predictive(model, guide, _batches(synthetic_batch(n=5), 5), num_samples=3)
    np.testing.assert_array_equal(out.probs[0], out.probs[2])


def test_guide_sample_sites_and_argument_errors(blob_model):
    model, guide = blob_model
    batches = _batches(synthetic_batch(n=4), 4)
    assert guide_sample_sites(guide, batches[0]) == guide.site_names
    with pytest.raises(ValueError, match="num_samples must be a positive integer, got 0"):
        draw_predictive(model, guide, batches, num_samples=0)
    with pytest.raises(ValueError, match="no evaluation batches"):
        draw_predictive(model, guide, [], num_samples=1)
    with pytest.raises(ValueError, match=r"the guide has no sample sites \['nope.lora_A'\]"):
        draw_predictive(model, guide, batches, num_samples=1, posterior_sites=["nope.lora_A"])
