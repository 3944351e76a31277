"""``python -m blob_pyro.sweep``: epochs -> steps, one compare folder per length, resumable, table and figure."""

import json

import pytest

from blob_pyro import compare, sweep


def test_steps_for_epochs_counts_the_partial_last_batch():
    assert sweep.steps_for_epochs(31, num_train=640, batch_size=4) == 4960  # the paper's WG-S regime
    assert sweep.steps_for_epochs(1, num_train=576, batch_size=16) == 36
    assert sweep.steps_for_epochs(2, num_train=10, batch_size=4) == 6  # ceil(10 / 4) = 3 per epoch
    with pytest.raises(ValueError, match="epochs must be positive"):
        sweep.steps_for_epochs(0, num_train=10, batch_size=4)


def fake_training(calls):
    """Stands in for the training subprocess: records argv, writes a metrics.json whose accuracy is the step
    count / 1000 (so the table can be checked against the steps the sweep asked for)."""

    def run(argv):
        calls.append(argv)
        out = argv[argv.index("--output-dir") + 1]
        steps = int(argv[argv.index("--max-steps") + 1])
        seed = int(argv[argv.index("--seed") + 1])
        entry = {"acc": steps / 1000, "ece": 10.0 + seed, "nll": 1.0, "brier": 0.5, "n_examples": 8, "ece_bins": 15}
        from pathlib import Path

        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps({"mean": entry, "samples_10": entry}))
        import numpy as np

        from blob_pyro.rundir import save_predictions

        save_predictions(out, {"mean": np.full((8, 2), 0.5), "samples_10": np.full((8, 2), 0.5)}, np.zeros(8))

    return run


def test_sweep_runs_one_compare_per_length_and_resumes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "run_training", fake_training(calls))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": list(range(40)), "validation": [40, 41], "procedure": "test", "seed": 0}))
    model = tmp_path / "model"  # passes compare's model check (no SmolLM2 package needed): nothing is loaded
    model.mkdir()
    (model / "config.json").write_text("{}")
    argv = ["--epochs", "1,3", "--methods", "mle,blob", "--seeds", "1,2", "--output-dir", str(tmp_path / "sweep"),
            "--split-file", str(split), "--batch-size", "16", "--model", str(model)]
    rows = sweep.main(argv)
    assert len(calls) == 2 * 2 * 2
    steps = sorted({int(c[c.index("--max-steps") + 1]) for c in calls})
    assert steps == [3, 9]  # ceil(40 / 16) = 3 steps per epoch
    assert all(str(tmp_path / "sweep" / "epochs_1") in c[c.index("--output-dir") + 1] or
               str(tmp_path / "sweep" / "epochs_3") in c[c.index("--output-dir") + 1] for c in calls)
    blob3 = next(r for r in rows if r["method"] == "blob" and r["epochs"] == 3)
    assert blob3["acc_mean"] == pytest.approx(0.9) and blob3["seeds"] == 2
    assert blob3["ece_values"] == [11.0, 12.0] and blob3["ece_mean"] == pytest.approx(11.5)
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    assert "| 3 | blob | samples_10 | 2 |" in (tmp_path / "sweep" / "sweep.md").read_text()
    calls.clear()
    sweep.main(argv)  # everything finished: nothing runs again
    assert calls == []


def test_sweep_refuses_max_steps_and_bad_epochs(tmp_path):
    with pytest.raises(SystemExit):
        sweep.main(["--epochs", "1", "--methods", "mle", "--output-dir", str(tmp_path), "--max-steps", "5"])
    with pytest.raises(SystemExit):
        sweep.main(["--epochs", "0,2", "--methods", "mle", "--output-dir", str(tmp_path)])


def test_posterior_summary_reads_the_std_and_the_update_ratio_from_the_run_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    site = "model.layers.0.q_proj.lora_A"
    G = torch.tensor([[0.1, 0.2], [0.3, 0.4]])  # std = G^2 = 0.01, 0.04, 0.09, 0.16
    M = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    B = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    save_file({f"locs.{site}_unconstrained": M, f"std_roots.{site}_unconstrained": G}, tmp_path / "guide.safetensors")
    save_file({"model.layers.0.q_proj.lora_B": B}, tmp_path / "adapter.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"alpha": 4.0, "rank": 2}))
    summary = sweep.posterior_summary(tmp_path)
    assert (summary["std_min"], summary["std_max"]) == pytest.approx((0.01, 0.16))
    assert summary["std_median"] == pytest.approx(0.04)  # torch's median of 4 values: the lower middle one
    # scaling 2: mean update ||2 B M||_F = 4; random part RMS = 2 * sqrt(||B_0||^2 * (0.01^2 + 0.04^2)) = 4 * sqrt(0.0017)
    assert summary["noise_to_mean_median"] == pytest.approx((0.0017 ** 0.5))
    save_file({"values.x.lora_A_unconstrained": M}, tmp_path / "guide.safetensors")
    assert sweep.posterior_summary(tmp_path) is None  # a point estimate has no std


def test_training_summary_reads_the_train_nll_tail_and_the_kl_per_example(tmp_path):
    # 20 logged steps: nll 1.0 ... 0.05 (step i logs 1 - 0.05 i); the last 10 % = the last 2 entries
    log = [{"step": i, "loss": 0.0, "nll": 1.0 - 0.05 * i, "kl": 100.0 + i} for i in range(20)]
    log.append({"step": 20, "loss": 0.0, "nll": None, "kl": None})  # an entry without the terms is skipped
    (tmp_path / "train_log.jsonl").write_text("\n".join(json.dumps(e) for e in log) + "\n")
    (tmp_path / "split.json").write_text(json.dumps({"train": list(range(8)), "validation": [8]}))
    summary = sweep.training_summary(tmp_path)
    assert summary == {"train_nll_end": pytest.approx((0.10 + 0.05) / 2), "kl_per_example_end": pytest.approx(119.0 / 8)}
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 0, "loss": 0.3, "nll": 0.3, "kl": None}) + "\n")
    assert sweep.training_summary(tmp_path) == {"train_nll_end": pytest.approx(0.3)}  # MLE: no KL
    assert sweep.training_summary(tmp_path / "missing") == {}  # a post-hoc run's folder without these files
    # an autoguide's parameters are not in guide.safetensors: its mean |A| comes from the training log
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 0, "loss": 0.3, "nll": 0.3, "mean_abs_A": 0.25}) + "\n")
    assert sweep.training_summary(tmp_path)["mean_abs_A"] == 0.25


def _write_blob_run(run_dir):
    import torch
    from safetensors.torch import save_file

    save_file({"locs.m.q.lora_A_unconstrained": torch.tensor([[1.0, -3.0]]),
               "std_roots.m.q.lora_A_unconstrained": torch.tensor([[0.5, 0.5]]),  # std 0.25: not the mean
               "locs.m.q.lora_B_unconstrained": torch.tensor([[50.0]]),  # B: not A
               "locs.m.v.lora_A_unconstrained": torch.tensor([[0.0, 4.0]]),
               "std_roots.m.v.lora_A_unconstrained": torch.tensor([[0.1, 0.2]])}, run_dir / "guide.safetensors")
    save_file({"m.q.lora_B": torch.tensor([[1.0]]), "m.v.lora_B": torch.tensor([[2.0]])}, run_dir / "adapter.safetensors")
    (run_dir / "config.json").write_text(json.dumps({"alpha": 2.0, "rank": 1}))


def test_weight_summary_is_cached_so_a_clone_without_the_safetensors_keeps_the_std_columns(tmp_path):
    _write_blob_run(tmp_path)
    summary = sweep.weight_summary(tmp_path)
    assert summary["mean_abs_A"] == pytest.approx((1 + 3 + 0 + 4) / 4)  # the posterior mean M of A only
    assert (summary["std_min"], summary["std_max"]) == pytest.approx((0.01, 0.25))
    assert summary == {**sweep.posterior_summary(tmp_path), "mean_abs_A": summary["mean_abs_A"]}
    assert "source" in json.loads((tmp_path / sweep.WEIGHT_SUMMARY).read_text())
    (tmp_path / "guide.safetensors").unlink()  # a fresh clone: the large files are not committed
    (tmp_path / "adapter.safetensors").unlink()
    assert sweep.weight_summary(tmp_path) == pytest.approx(summary)
    (tmp_path / sweep.WEIGHT_SUMMARY).write_text('{"std_min": 0.0')  # cut mid-write
    with pytest.raises(ValueError, match=r"weight_summary.json is corrupt .*delete it"):
        sweep.weight_summary(tmp_path)
    (tmp_path / sweep.WEIGHT_SUMMARY).unlink()
    assert sweep.weight_summary(tmp_path) == {}  # neither: the columns stay empty
    import torch
    from safetensors.torch import save_file

    save_file({"values.m.q.lora_A_unconstrained": torch.tensor([[-2.0]])}, tmp_path / "guide.safetensors")
    assert sweep.weight_summary(tmp_path) == {"mean_abs_A": 2.0}  # a point estimate: |A|, no std


def test_a_corrupt_training_log_line_is_named_with_what_to_do(tmp_path):
    good = json.dumps({"step": 0, "loss": 0.3, "nll": 0.3, "kl": None})
    (tmp_path / "train_log.jsonl").write_text(good + "\n\n" + '{"step": 20, "nll": 0.' + "\n")  # cut mid-write
    with pytest.raises(ValueError, match=r"train_log.jsonl, line 3, is not valid JSON .*Delete that line"):
        sweep.training_summary(tmp_path)
    (tmp_path / "train_log.jsonl").write_text(good + "\n")  # the advice works: the lines before it are reported
    assert sweep.training_summary(tmp_path) == {"train_nll_end": pytest.approx(0.3)}


def test_sweep_tables_keep_the_columns_of_every_row(tmp_path):
    rows = [{"epochs": 1.0, "method": "mle", "mode": "mean", "seeds": 1, "n": 4, "wall_seconds": 1.0,
             **{f"{k}_{s}": 0.5 for k, _, _ in compare.METRICS for s in ("mean", "std")}}]
    rows.append({**rows[0], "method": "blob", "std_min": 0.01, "std_median": 0.02, "std_max": 0.03,
                 "noise_to_mean_median": 0.5, "train_nll_end": 0.25, "kl_per_example_end": 12.5, "mean_abs_A": 0.03})
    text = sweep.write_sweep_tables(tmp_path, rows)
    assert "| 0.0100 / 0.0200 / 0.0300 | 0.50 | 0.03 | 0.25 | 12.5 | 1 |" in text
    header = (tmp_path / "sweep.csv").read_text().splitlines()[0].split(",")
    assert {"std_median", "train_nll_end", "kl_per_example_end", "mean_abs_A"} <= set(header)  # not only row 0's keys
    rows[1]["method"] = "blob (N = 0)"
    assert sweep.plot_sweep(tmp_path, rows).stat().st_size > 0
