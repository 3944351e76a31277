"""Data-parallel SVI (blob_pyro.distributed): 2 gloo processes at batch b take the steps of 1 process at 2b."""

import contextlib
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from blob_pyro.distributed import DataParallel, check_divisible_epochs, shard_batch, shard_bounds
from blob_pyro.models.flipout_signs import flipout_signs, global_batch_rows
from blob_pyro.train import main
from tests.conftest import write_bigbench_task

PER_PROCESS_BATCH = 3
# 21 training examples at a global batch of 6: the epoch's last batch holds 3 (shards of 2 and 1), so
# the unequal shard weights are exercised; 5 steps cross into the second epoch.
COMMON = ["--num-train", "21", "--num-validation", "9", "--max-steps", "5", "--eval-samples", "2", "--eval-batch-size", "9",
          "--rank", "2", "--target-modules", "q_proj,v_proj,lm_head", "--no-zero-shot", "--log-every", "1", "--seed", "3"]
CONFIGS = {
    "mle": ["--guide", "mle"],
    "blob_elbo": ["--guide", "blob", "--kl-schedule", "blob", "--dataset-rescaling"],
    "blob_elbo_flipout_separate": ["--guide", "blob", "--flipout", "token", "--choice-layout", "separate"],
    "parity_flipout": ["--guide", "blob", "--objective", "parity", "--flipout", "token", "--kllr", "0.05"],
}


def run_args(model_dir, task, out, batch_size, extra):
    return ["--model", str(model_dir), "--task", str(task), "--output-dir", str(out), "--batch-size", str(batch_size),
            *COMMON, *extra]


GRADIENT_CASES = ("elbo", "elbo_flipout", "parity_flipout")


def first_step_gradients(case: str, parallel=None) -> dict:
    """The combined gradients that reach the optimiser in the first step of ``case`` on a tiny Llama, for
    a batch of 5 different examples (shards of 3 and 2 under 2 processes), keyed by parameter name."""
    import pyro

    from blob_pyro.guides import BLoBGuide
    from blob_pyro.objectives import ELBOObjective, KLWeighting, ParityObjective
    from tests.helpers import synthetic_batch, tiny_bayesian_llama

    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    model = tiny_bayesian_llama()
    guide = BLoBGuide(model, eps=0.3)  # a wide posterior: the draw of A and the flipout signs matter
    kl = KLWeighting("constant", 4)
    flipout = "token" if case.endswith("flipout") else None
    if case.startswith("parity"):
        objective = ParityObjective(model, guide, total_steps=4, kl=kl, lr=1e-3, flipout=flipout)
        holder = objective
    else:
        objective = ELBOObjective(model, guide, num_data=40, total_steps=4, kl=kl, lr=1e-3, flipout=flipout, max_grad_norm=None)
        holder = objective.optim
    if parallel is not None:
        parallel.attach(objective)
    reducer, recorded = holder.gradient_reducer or (lambda params: params), {}

    def record(params):
        params = reducer(params)
        store = pyro.get_param_store()
        recorded.update({store.param_name(p) or f"#{i}": p.grad.clone() for i, p in enumerate(params)})
        return params

    holder.gradient_reducer = record
    batch = synthetic_batch(n=5, seq=6, seed=1)
    if parallel is None:
        objective.step(batch, 0)
    else:
        parallel.step(objective, batch, 0)
    return recorded


def _worker(rank: int, world_size: int, port: int, model_dir: str, task: str, root: str) -> None:
    from blob_pyro.distributed import DataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        parallel = DataParallel.from_environment("cpu")
        torch.save({case: first_step_gradients(case, parallel) for case in GRADIENT_CASES}, os.path.join(root, f"gradients_{rank}.pt"))
        seen = {"returned_with_metrics": {}, "finished_when_returned": {}}
        with slow_run_end(rank):
            for name, extra in CONFIGS.items():
                out = os.path.join(root, f"{name}_parallel")
                metrics = main(run_args(model_dir, task, out, PER_PROCESS_BATCH, extra))
                seen["returned_with_metrics"][name] = metrics != {}
                seen["finished_when_returned"][name] = os.path.isfile(os.path.join(out, "metrics.json"))
        interrupted_then_resumed(rank, model_dir, task, root)
        seen["failed_evaluation"] = failed_evaluation_error(rank, model_dir, task, root)
        with open(os.path.join(root, f"seen_{rank}.json"), "w") as f:
            json.dump(seen, f)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def slow_run_end(rank: int):
    """Rank 0 writes the run's end files a second late: the other process must wait for them."""
    import time

    from blob_pyro import train as train_module

    original = train_module.write_run_end

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return original(*args, **kwargs)

    train_module.write_run_end = slow if rank == 0 else original
    try:
        yield
    finally:
        train_module.write_run_end = original


def failed_evaluation_error(rank: int, model_dir: str, task: str, root: str) -> str:
    """Run 1 step where rank 0's evaluation raises; returns the error this process raised ("" if none)."""
    from blob_pyro import train as train_module

    original = train_module.evaluate_after_training

    def broken(*args, **kwargs):
        raise OSError("disk full")

    train_module.evaluate_after_training = broken if rank == 0 else original
    argv = run_args(model_dir, task, os.path.join(root, "failed_evaluation"), PER_PROCESS_BATCH, CONFIGS["mle"])
    try:
        main([*argv, "--max-steps", "1"])
        return ""
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    finally:
        train_module.evaluate_after_training = original


RESUMED = "parity_flipout"  # the most state to carry over: the KL cycle's position, flipout and Adam


def interrupted_then_resumed(rank: int, model_dir: str, task: str, root: str) -> None:
    """Train RESUMED with 2 processes where SIGTERM reaches rank 1 alone, just before its step 2 (torchrun
    forwards signals, but they need not land in the same step); then resume it with 2 processes."""
    import signal
    import time

    from blob_pyro import objectives
    from blob_pyro import train as train_module
    from blob_pyro.resume import CHECKPOINT_FILE

    out = os.path.join(root, f"{RESUMED}_resumed_parallel")
    argv = run_args(model_dir, task, out, PER_PROCESS_BATCH, CONFIGS[RESUMED])
    original_step, original_save, calls = objectives.ParityObjective.step, train_module.save_checkpoint, [0]

    def step(self, batch, step):
        if rank == 1 and calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        calls[0] += 1
        return original_step(self, batch, step)

    def slow_save(*args, **kwargs):  # a slow disk: rank 1 must not leave before the checkpoint exists
        time.sleep(1.0)
        return original_save(*args, **kwargs)

    objectives.ParityObjective.step, train_module.save_checkpoint = step, slow_save
    try:
        main(argv)
        raise AssertionError("the run was not interrupted")
    except SystemExit as stopped:  # both processes stop after the same step; rank 0 wrote the checkpoint
        assert stopped.code == 128 + signal.SIGTERM, stopped.code
        assert os.path.isfile(os.path.join(out, CHECKPOINT_FILE)), f"rank {rank} left before the checkpoint was written"
    finally:
        objectives.ParityObjective.step, train_module.save_checkpoint = original_step, original_save
    main([*argv, "--resume"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory, tiny_causal_lm_dir):
    """Every config of CONFIGS trained by 2 gloo processes (one spawn) at per-process batch 3."""
    root = tmp_path_factory.mktemp("parallel")
    task = write_bigbench_task(root / "task.json", num_examples=40)
    mp.spawn(_worker, args=(2, free_port(), str(tiny_causal_lm_dir), str(task), str(root)), nprocs=2, join=True)
    return root, task


def read_run(out):
    tensors = {**{f"adapter/{k}": v for k, v in load_file(out / "adapter.safetensors").items()},
               **{f"guide/{k}": v for k, v in load_file(out / "guide.safetensors").items()}}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return tensors, log, json.loads((out / "metrics.json").read_text())


def test_every_process_stays_until_rank_0_has_written_the_run(parallel_runs):
    """Rank 0 alone evaluates (a second slower here); the other process returns {} only once rank 0's
    metrics.json exists. Leaving at once tore gloo down on rank 1 while rank 0 evaluated, which aborted
    rank 1 now and then ("terminate called without an active exception"), and torchrun then stops rank 0."""
    root, _ = parallel_runs
    for rank in (0, 1):
        seen = json.loads((root / f"seen_{rank}.json").read_text())
        assert seen["returned_with_metrics"] == {name: rank == 0 for name in CONFIGS}
        assert seen["finished_when_returned"] == {name: True for name in CONFIGS}, f"rank {rank} left early"


def test_a_failed_evaluation_on_rank_0_fails_every_process(parallel_runs):
    """Rank 0 raises its own error; the waiting process raises one naming rank 0 instead of a silent
    success or a hang until the process-group timeout."""
    root, _ = parallel_runs
    seen = [json.loads((root / f"seen_{rank}.json").read_text())["failed_evaluation"] for rank in (0, 1)]
    assert seen[0] == "OSError: disk full"
    assert seen[1].startswith("RuntimeError: rank 0 failed after training")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_match_one_process_at_double_batch(name, parallel_runs, tiny_causal_lm_dir):
    root, task = parallel_runs
    single = root / f"{name}_single"
    main(run_args(tiny_causal_lm_dir, task, single, 2 * PER_PROCESS_BATCH, CONFIGS[name]))
    parallel_tensors, parallel_log, parallel_metrics = read_run(root / f"{name}_parallel")
    single_tensors, single_log, single_metrics = read_run(single)
    assert parallel_tensors.keys() == single_tensors.keys()
    moved = 0.0
    for key, value in single_tensors.items():
        torch.testing.assert_close(parallel_tensors[key], value, rtol=1e-5, atol=1e-6, msg=key)
        if "lora_B" in key:
            moved = max(moved, float(value.abs().max()))
    assert moved > 1e-3  # B starts at 0: the comparison is between trained parameters
    assert [r["step"] for r in parallel_log] == [r["step"] for r in single_log] == list(range(5))
    for p, s in zip(parallel_log, single_log):  # the logged loss (and NLL) are the global-batch values
        for key in set(s) & {"loss", "nll", "kl", "kl_weight", "grad_norm_per_example"}:
            if s[key] is None:  # e.g. the KL of plain LoRA (no prior term)
                assert p[key] is None, key
            else:
                assert p[key] == pytest.approx(s[key], rel=1e-5, abs=1e-6), key
    for mode in single_metrics:  # evaluation on rank 0 continues the one-process random stream
        assert parallel_metrics[mode]["nll"] == pytest.approx(single_metrics[mode]["nll"], rel=1e-5)
    assert json.loads((root / f"{name}_parallel" / "run.json").read_text())["processes"] == 2


def test_a_run_stopped_on_one_process_resumes_to_the_one_process_result(parallel_runs, tiny_causal_lm_dir):
    """SIGTERM on rank 1 alone stops both processes after step 3 (checkpoint by rank 0); ``--resume`` with 2
    processes then ends where one uninterrupted process at double batch ends."""
    root, task = parallel_runs
    single = root / f"{RESUMED}_single"
    if not (single / "metrics.json").exists():
        main(run_args(tiny_causal_lm_dir, task, single, 2 * PER_PROCESS_BATCH, CONFIGS[RESUMED]))
    resumed = root / f"{RESUMED}_resumed_parallel"
    assert json.loads((resumed / "run.json").read_text())["resumed_at_steps"] == [3]
    resumed_tensors, resumed_log, resumed_metrics = read_run(resumed)
    single_tensors, single_log, single_metrics = read_run(single)
    assert resumed_tensors.keys() == single_tensors.keys()
    for key, value in single_tensors.items():
        torch.testing.assert_close(resumed_tensors[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert [r["step"] for r in resumed_log] == list(range(5))  # no step logged twice or lost
    for p, s in zip(resumed_log, single_log):
        assert p["loss"] == pytest.approx(s["loss"], rel=1e-5, abs=1e-6)
    for mode in single_metrics:
        assert resumed_metrics[mode]["nll"] == pytest.approx(single_metrics[mode]["nll"], rel=1e-5)


@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_combined_gradients_are_the_global_batch_gradients(case, parallel_runs):
    """Sharper than the trained parameters (Adam's first steps are nearly sign steps): the gradients each
    process hands its optimiser equal one process's gradients on the whole batch, on both ranks."""
    root, _ = parallel_runs
    expected = first_step_gradients(case)
    for rank in (0, 1):
        combined = torch.load(root / f"gradients_{rank}.pt")[case]
        assert combined.keys() == expected.keys() and len(expected) >= 10
        assert sum(bool(g.abs().max() > 0) for g in expected.values()) >= 5  # gradients that can disagree
        for name, grad in expected.items():
            # Summing two shards rounds differently from one batch: float32 error scales with the largest
            # entries, so near-zero entries get an absolute tolerance tied to the tensor's scale (a wrong
            # shard weight or a missing all-reduce is off by >= 10 % of that scale).
            # (B starts at 0, so A's gradients are exactly 0 in the first step: those must stay 0.)
            scale = float(grad.abs().max())
            torch.testing.assert_close(combined[name], grad, rtol=1e-5, atol=1e-5 * scale + 1e-12,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_dataset_rescaling_counts_processes():
    from blob_pyro.schedules import kl_cycle_length

    # M = int(100 N^(pi/gamma) / P / b): 2 processes at b = 3 share the cycle of 1 process at b = 6.
    two = kl_cycle_length(21, 3, dataset_rescaling=True, processes=2)
    assert two == kl_cycle_length(21, 6, dataset_rescaling=True) == int(100 * 21 ** (torch.pi / 8) / 6)


def test_shard_bounds_cover_the_batch_without_overlap():
    for total in (1, 2, 5, 6, 7):
        bounds = [shard_bounds(total, r, 3) for r in range(3)]
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [stop - start for start, stop in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_batch_keeps_whole_examples_and_width():
    batch = {"input_ids": torch.arange(5 * 3 * 4).view(15, 4), "labels": torch.arange(5), "indices": torch.arange(5) + 10}
    shard = shard_batch(batch, 2, 4)  # 3 rows per example (one per choice)
    assert torch.equal(shard["input_ids"], batch["input_ids"][6:12]) and torch.equal(shard["indices"], torch.tensor([12, 13]))
    with pytest.raises(ValueError, match="7 rows for 5 examples; expected a whole number of rows per example"):
        shard_batch({"labels": torch.arange(5), "x": torch.zeros(7)}, 0, 2)


@pytest.mark.parametrize("rows_per_example", [1, 4])
def test_flipout_signs_of_a_shard_are_the_global_draw_sliced(rows_per_example):
    like = torch.zeros(())
    shape = (6 * rows_per_example, 5, 3)
    torch.manual_seed(7)
    full = flipout_signs(torch.Size(shape), like)
    after_full = torch.rand(())
    torch.manual_seed(7)
    with global_batch_rows(4, 6, 6):
        part = flipout_signs(torch.Size((2 * rows_per_example, 5, 3)), like)
    assert torch.equal(part, full[4 * rows_per_example :])
    assert torch.equal(torch.rand(()), after_full)  # the random stream advanced as in the one-process draw
    assert set(full.unique().tolist()) == {-1.0, 1.0}


def test_flipout_shard_errors_name_the_problem():
    with pytest.raises(ValueError, match="need 0 <= start < stop <= total"):
        with global_batch_rows(3, 3, 6):
            pass
    with global_batch_rows(0, 2, 6), pytest.raises(ValueError, match="5 rows cannot be mapped onto a shard of 2 examples"):
        flipout_signs(torch.Size((5, 3)), torch.zeros(()))


def test_short_last_batch_is_refused_with_the_fix():
    check_divisible_epochs(21, 6, 2)  # last batch of 3 >= 2 processes
    with pytest.raises(ValueError, match="last batch of each epoch holds 1 of 25 training examples, fewer than the 2 processes"):
        check_divisible_epochs(25, 6, 2)


def test_single_process_is_the_default(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parallel = DataParallel.from_environment("cpu")
    assert not parallel.active and parallel.is_main and parallel.world_size == 1


def test_baselines_refuse_torchrun(monkeypatch, tmp_path):
    from blob_pyro.config import TrainConfig
    from blob_pyro.train import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    model = tmp_path / "model"  # passes the model check before training (no SmolLM2 package needed)
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = TrainConfig(method="ensemble", model=str(model), output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="--method ensemble runs in one process; launch it without torchrun"):
        train(cfg)


def test_one_gpu_device_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--device cuda:1 names one GPU"):
        DataParallel.from_environment("cuda:1")


@pytest.mark.slow  # ~25 s: launches torchrun's agent and two fresh interpreters; the spawn tests above cover the maths
def test_torchrun_command_line_matches_one_process(tmp_path, tiny_causal_lm_dir):
    """The documented launch: ``torchrun --standalone --nproc_per_node 2 -m blob_pyro.train`` (gloo, env://)."""
    import subprocess
    import sys

    task = write_bigbench_task(tmp_path / "task.json", num_examples=40)
    extra = CONFIGS["blob_elbo_flipout_separate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "blob_pyro.train",
               *run_args(tiny_causal_lm_dir, task, tmp_path / "parallel", PER_PROCESS_BATCH, extra), "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    main(run_args(tiny_causal_lm_dir, task, tmp_path / "single", 2 * PER_PROCESS_BATCH, extra))
    parallel_tensors, _, parallel_metrics = read_run(tmp_path / "parallel")
    single_tensors, _, single_metrics = read_run(tmp_path / "single")
    for key, value in single_tensors.items():
        torch.testing.assert_close(parallel_tensors[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert parallel_metrics.keys() == single_metrics.keys()
    assert sorted(p.name for p in (tmp_path / "parallel").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
