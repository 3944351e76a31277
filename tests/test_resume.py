"""Checkpoints and --resume: a run killed (SIGKILL, in a subprocess) at a random step after a checkpoint and
resumed ends bitwise equal to an uninterrupted run; SIGTERM checkpoints and exits; refusals are clear."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from blob_pyro.resume import CHECKPOINT_FILE, read_checkpoint
from blob_pyro.state_codec import flatten, unflatten
from blob_pyro.train import main
from tests.conftest import write_bigbench_task

MAX_STEPS = 8
RUN_FILES = ("adapter.safetensors", "guide.safetensors", "metrics.json", "train_log.jsonl", "predictions.npz")

# Runs main(argv) in a fresh process and sends itself `signal` just before objective step number `at`
# (counted over the whole process: an ensemble's members step one after another).
KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)  # as the in-process runs under tests/conftest.py
    from blob_pyro import objectives
    at, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
    calls = [0]
    for cls in (objectives.ELBOObjective, objectives.ParityObjective):
        def step(self, batch, step, _original=cls.step):
            if calls[0] == at:
                os.kill(os.getpid(), sig)
            calls[0] += 1
            return _original(self, batch, step)
        cls.step = step
    from blob_pyro.train import main
    main(sys.argv[3:])
""")


def run_args(model_dir, task, out, *extra):
    return [
        "--model", str(model_dir), "--task", str(task), "--output-dir", str(out), "--num-train", "24",
        "--num-validation", "12", "--max-steps", str(MAX_STEPS), "--batch-size", "5", "--eval-samples", "2",
        "--eval-batch-size", "6", "--rank", "2", "--target-modules", "q_proj,v_proj,lm_head", "--log-every", "1",
        "--device", "cpu", *extra,
    ]


def run_killed(tmp_path, at: int, sig: str, argv: list) -> subprocess.CompletedProcess:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), str(at), sig, *argv], env=env, capture_output=True, text=True, timeout=300)


def assert_same_files(expected_dir, found_dir, names=RUN_FILES):
    for name in names:
        assert (found_dir / name).read_bytes() == (expected_dir / name).read_bytes(), f"{name} differs from the uninterrupted run"


@pytest.mark.parametrize("case,extra,subdir", [
    ("elbo_flipout", ["--flipout", "token"], ""),
    ("parity_blob", ["--objective", "parity", "--kl-schedule", "blob"], ""),
    ("ensemble_member", ["--method", "ensemble", "--ensemble-size", "2", "--guide", "mle"], "member_1"),
])
def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, tiny_causal_lm_dir, case, extra, subdir):
    task = write_bigbench_task(tmp_path / "task.json")
    main(run_args(tiny_causal_lm_dir, task, tmp_path / "reference", *extra))
    # a random step after the first checkpoint (after step 2), in the last member for the ensemble
    offset = MAX_STEPS if subdir else 0
    at = offset + random.Random().randrange(3, MAX_STEPS)
    out = tmp_path / "killed"
    killed = run_killed(tmp_path, at, "SIGKILL", run_args(tiny_causal_lm_dir, task, out, *extra, "--checkpoint-every", "2"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = out / subdir
    assert not (run_dir / "metrics.json").exists()
    checkpoint = read_checkpoint(run_dir)
    assert checkpoint.step == (at - offset) // 2 * 2, f"killed before step {at - offset}"
    main(run_args(tiny_causal_lm_dir, task, out, *extra, "--resume"))
    assert_same_files(tmp_path / "reference" / subdir, run_dir)
    if subdir:  # the ensemble's own predictive and metrics
        assert_same_files(tmp_path / "reference", out, ("metrics.json", "predictions.npz"))
    assert not (run_dir / CHECKPOINT_FILE).exists()  # spent once metrics.json is written
    assert json.loads((run_dir / "run.json").read_text())["resumed_at_steps"] == [checkpoint.step]


def interrupt_at(monkeypatch, at: int, signum=signal.SIGTERM):
    """Make the in-process run send itself ``signum`` before its objective step ``at``."""
    from blob_pyro import objectives

    calls = [0]
    for cls in (objectives.ELBOObjective, objectives.ParityObjective):
        def step(self, batch, step, _original=cls.step):
            if calls[0] == at:
                os.kill(os.getpid(), signum)
            calls[0] += 1
            return _original(self, batch, step)
        monkeypatch.setattr(cls, "step", step)


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, tiny_causal_lm_dir, monkeypatch):
    """Also covers a Pyro parameter outside the modules (the hierarchical prior's scale) and --log-every."""
    task = write_bigbench_task(tmp_path / "task.json")
    extra = ["--prior", "hierarchical", "--elbo", "meanfield"]
    main(run_args(tiny_causal_lm_dir, task, tmp_path / "reference", *extra))
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        with pytest.raises(SystemExit) as stopped:
            main(run_args(tiny_causal_lm_dir, task, out, *extra))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "SIGTERM received: stopped after step 4 of 8" in str(stopped.value) and "--resume" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the loop
    checkpoint = read_checkpoint(out)
    assert checkpoint.step == 4 and "prior.scale" in checkpoint.state["param_store"]
    assert checkpoint.state["kl"]["position"] == 4 % checkpoint.state["kl"]["cycle_length"]
    main(run_args(tiny_causal_lm_dir, task, out, *extra, "--resume"))
    assert_same_files(tmp_path / "reference", out)


def test_a_signal_during_the_last_checkpoint_stops_before_the_evaluation(tmp_path, tiny_causal_lm_dir, monkeypatch):
    """SIGTERM while the final checkpoint is written (after the last step's stop check): the run stops with
    that checkpoint instead of evaluating, and --resume goes straight to the evaluation."""
    import blob_pyro.train as train_module

    task = write_bigbench_task(tmp_path / "task.json")
    main(run_args(tiny_causal_lm_dir, task, tmp_path / "reference"))
    original = train_module.save_checkpoint

    def save_then_signal(out, **kwargs):
        path = original(out, **kwargs)
        if kwargs["step"] == MAX_STEPS:
            os.kill(os.getpid(), signal.SIGTERM)
        return path

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "save_checkpoint", save_then_signal)
        with pytest.raises(SystemExit) as stopped:
            main(run_args(tiny_causal_lm_dir, task, out))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert f"stopped after step {MAX_STEPS} of {MAX_STEPS}" in str(stopped.value)
    assert not (out / "metrics.json").exists() and read_checkpoint(out).step == MAX_STEPS
    main(run_args(tiny_causal_lm_dir, task, out, "--resume"))
    assert_same_files(tmp_path / "reference", out)
    assert json.loads((out / "run.json").read_text())["resumed_at_steps"] == [MAX_STEPS]


@pytest.fixture
def interrupted_run(tmp_path, tiny_causal_lm_dir, monkeypatch):
    task = write_bigbench_task(tmp_path / "task.json")
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        with pytest.raises(SystemExit):
            main(run_args(tiny_causal_lm_dir, task, out))
    return lambda *extra: run_args(tiny_causal_lm_dir, task, out, *extra), out


def test_a_config_that_changes_the_result_is_refused_naming_the_field(interrupted_run):
    args, out = interrupted_run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"differs from the checkpoint's .*--lr: checkpoint 0\.001, now 0\.002"):
        main(args("--resume", "--lr", "0.002"))
    with pytest.raises(ValueError, match=r"--rank: checkpoint 2, now 4.*--seed: checkpoint 1, now 5"):
        main(args("--resume", "--seed", "5", "--rank", "4"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written
    main(args("--resume", "--log-every", "3", "--checkpoint-every", "1"))  # free fields may differ
    assert (out / "metrics.json").exists()


def test_a_corrupt_or_truncated_checkpoint_is_refused_and_nothing_is_lost(interrupted_run):
    args, out = interrupted_run
    path = out / CHECKPOINT_FILE
    good = path.read_bytes()
    for damaged in (good[: len(good) // 2], b"not a checkpoint", good[:9] + b"\x00" + good[10:], good[:-3] + b"xyz"):
        path.write_bytes(damaged)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(ValueError, match="is not a readable training checkpoint .* corrupt or truncated; nothing was changed"):
            main(args("--resume"))
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    path.write_bytes(good)
    main(args("--resume"))
    assert (out / "metrics.json").exists()


def test_an_unfinished_run_is_not_restarted_silently(interrupted_run, tmp_path):
    args, out = interrupted_run
    with pytest.raises(SystemExit, match="holds an unfinished run with a checkpoint .* pass --resume"):
        main(args())
    with pytest.raises(SystemExit, match="holds no checkpoint.safetensors; run without --resume"):
        main(args("--resume", "--output-dir", str(tmp_path / "elsewhere")))
    main(args("--overwrite"))  # starts again from step 0
    assert json.loads((out / "run.json").read_text())["resumed_at_steps"] == []


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one(interrupted_run, monkeypatch):
    """The temporary file of an interrupted write is never read; the last complete checkpoint is."""
    import blob_pyro.resume as resume

    args, out = interrupted_run
    step = read_checkpoint(out).step

    class Killed(Exception):
        pass

    def killed_before_rename(src, dst):
        raise Killed("killed between writing the temporary file and renaming it")

    monkeypatch.setattr(resume.os, "replace", killed_before_rename)
    with pytest.raises(Killed):
        main(args("--resume", "--checkpoint-every", "1"))
    assert (out / (CHECKPOINT_FILE + ".tmp")).exists() and read_checkpoint(out).step == step


def test_state_codec_round_trips_optimiser_and_rng_states_exactly():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimiser = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 / (step + 1))
    for _ in range(2):
        sum(p.sum() for p in params).backward()
        optimiser.step()
        scheduler.step()
    state = {"optimizer": optimiser.state_dict(), "scheduler": scheduler.state_dict(), "numpy": np.random.get_state(),
             "python": random.getstate(), "torch": torch.get_rng_state(), "odd": {"$tensor": 1.0 / 3.0, 0: "int key"}}
    structure, tensors = flatten(state, "x")
    back = unflatten(json.loads(json.dumps(structure)), tensors)  # through JSON text, as in the file
    assert isinstance(back["optimizer"]["param_groups"][0]["betas"], tuple)
    assert set(back["optimizer"]["state"]) == {0, 1}  # integer keys stay integers
    torch.testing.assert_close(back["optimizer"]["state"][1]["exp_avg_sq"], optimiser.state[params[1]]["exp_avg_sq"], rtol=0, atol=0)
    assert back["scheduler"] == scheduler.state_dict() and back["python"] == random.getstate()
    assert back["odd"] == {"$tensor": 1.0 / 3.0, 0: "int key"}
    assert back["numpy"][0] == "MT19937" and (back["numpy"][1] == np.random.get_state()[1]).all()
    np.random.set_state(back["numpy"])
    random.setstate(back["python"])
    with pytest.raises(TypeError, match="cannot store a object at 'x/thing'.*no pickle"):
        flatten({"thing": object()}, "x")


def test_training_batches_restart_at_any_position_as_the_uninterrupted_stream():
    """Against an independent reference: one permutation per epoch from one seeded generator."""
    from blob_pyro.assembly import TaskData, training_batches
    from blob_pyro.data import EncodedSplit

    n, b = 11, 4  # 3 batches per epoch, the last one short
    encoded = EncodedSplit([[1 + i] * (1 + i % 3) for i in range(n)], torch.arange(n) % 2)
    data = TaskData(task=None, split=None, train=encoded, validation=encoded, pad_token_id=0, padding_side="left")
    generator = torch.Generator().manual_seed(7)
    reference = []
    for _ in range(4):
        order = torch.randperm(n, generator=generator)
        reference += [order[i:i + b].tolist() for i in range(0, n, b)]
    stream = training_batches(data, batch_size=b, seed=7, device=torch.device("cpu"))
    assert [next(stream)["indices"].tolist() for _ in range(12)] == reference
    for start in (1, 3, 5, 9):
        resumed = training_batches(data, batch_size=b, seed=7, device=torch.device("cpu"), position=divmod(start, 3))
        assert [next(resumed)["indices"].tolist() for _ in range(12 - start)] == reference[start:]
    with pytest.raises(ValueError, match=r"data position \(0, 3\) is outside an epoch of 3 batches"):
        training_batches(data, batch_size=b, seed=7, device=torch.device("cpu"), position=(0, 3))


def test_compare_resumes_an_unfinished_run(tmp_path, monkeypatch):
    from blob_pyro import compare

    calls = []
    monkeypatch.setattr(compare, "run_training", calls.append)
    for method, checkpoint in (("blob", "seed_1"), ("ensemble", "seed_1/member_1")):
        (tmp_path / method / checkpoint).mkdir(parents=True)
        (tmp_path / method / checkpoint / CHECKPOINT_FILE).write_bytes(b"")
        compare.run_one(tmp_path, method, 1, ["--max-steps", "4"])
        assert calls[-1][-1] == "--resume"
    compare.run_one(tmp_path, "mle", 1, [])
    assert "--resume" not in calls[-1]
