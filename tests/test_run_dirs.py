"""Run directories you can trust: --overwrite clears the old run first, metrics.json (the finished marker)
is written last and atomically, and sub-runs are reused only when their config matches."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from blob_pyro.rundir import clear_run_dir, is_finished, write_text_atomic
from blob_pyro.train import main
from tests.conftest import write_bigbench_task

OLD_RUN_FILES = ("metrics.json", "run.json", "predictions.npz", "adapter.safetensors", "guide.safetensors", "split.json")


def _args(model_dir, task, out, *extra):
    return ["--model", str(model_dir), "--task", str(task), "--output-dir", str(out), "--num-train", "16", "--num-validation", "8",
            "--max-steps", "2", "--batch-size", "4", "--eval-samples", "2", "--eval-batch-size", "8", "--rank", "2",
            "--no-zero-shot", "--device", "cpu", *extra]


@pytest.fixture
def finished_run(tmp_path, tiny_causal_lm_dir):
    task = write_bigbench_task(tmp_path / "task.json")
    out = tmp_path / "run"
    main(_args(tiny_causal_lm_dir, task, out))
    (out / "evaluation").mkdir()
    (out / "evaluation" / "metrics.json").write_text("{}")  # an evaluation of the old run
    assert is_finished(out)
    return lambda *extra: _args(tiny_causal_lm_dir, task, out, *extra), out


def _looks_finished_to_everyone(out):
    from blob_pyro.evaluate import main as evaluate_main

    with pytest.raises(SystemExit, match="expected a finished run .*found none"):
        evaluate_main(["--run-dir", str(out), "--output-dir", str(out.parent / "eval_of_killed")])
    assert not (out.parent / "eval_of_killed").exists()
    return is_finished(out)


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing after it runs (not an Exception: no handler catches it)."""


@pytest.mark.parametrize("where", ["training", "predictions", "run.json", "metrics.json rename"])
def test_a_killed_overwrite_leaves_no_run_that_looks_finished(finished_run, where, monkeypatch):
    args, out = finished_run
    if where == "training":
        from blob_pyro.objectives import ELBOObjective

        step = ELBOObjective.step

        def dies_at_step_1(self, batch, i):
            if i == 1:
                raise Killed
            return step(self, batch, i)

        monkeypatch.setattr(ELBOObjective, "step", dies_at_step_1)
    elif where == "predictions":
        monkeypatch.setattr("blob_pyro.train.save_predictions", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    else:
        rename = os.rename
        target = where.split()[0]

        def dies_on(src, dst):
            if os.path.basename(dst) == target:
                raise Killed
            return rename(src, dst)

        monkeypatch.setattr(os, "rename", dies_on)
    with pytest.raises(Killed):
        main(args("--overwrite", "--max-steps", "3"))
    monkeypatch.undo()
    assert not (out / "metrics.json").exists()
    assert not _looks_finished_to_everyone(out)
    assert not (out / "evaluation").exists()  # the old run's evaluation went with it
    old_files = {"training": ("predictions.npz", "adapter.safetensors", "run.json"), "predictions": ("predictions.npz", "run.json"),
                 "run.json": ("run.json",)}.get(where, ())
    for name in old_files:  # killed before the new run wrote them: the old run's are gone, not left behind
        assert not (out / name).exists(), f"{name} of the old run survived the --overwrite"
    # the new config is what the folder now describes
    assert json.loads((out / "config.json").read_text())["max_steps"] == 3
    # an unfinished folder is not refused as "finished": killed after training it continues from its checkpoint
    resume = ("--resume",) if (out / "checkpoint.safetensors").exists() else ()
    assert bool(resume) == (where != "training")
    main(args("--max-steps", "3", *resume))
    assert is_finished(out) and not (out / "checkpoint.safetensors").exists()


def test_a_sigkilled_overwrite_subprocess_leaves_no_run_that_looks_finished(finished_run):
    args, out = finished_run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, "-m", "blob_pyro.train", *args("--overwrite", "--max-steps", "100000")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # the new run has cleared the old one and started training
            try:  # the old run's files disappear while the new run clears the folder
                started = (out / "train_log.jsonl").stat().st_size > 0 and '"max_steps": 100000' in (out / "config.json").read_text()
            except FileNotFoundError:
                started = False
            if started:
                break
            assert process.poll() is None, "the training subprocess ended early"
            time.sleep(0.1)
        else:
            pytest.fail("the overwrite run did not start training within 120 s")
        time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (out / "metrics.json").exists()
    for name in OLD_RUN_FILES:
        assert not (out / name).exists() or name == "split.json", f"{name} of the old run survived"
    assert not (out / "evaluation").exists()


def test_atomic_write_leaves_the_old_file_when_killed(tmp_path, monkeypatch):
    path = write_text_atomic(tmp_path / "metrics.json", '{"old": 1}\n')
    monkeypatch.setattr(os, "rename", lambda src, dst: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        write_text_atomic(path, '{"new": 2}\n')
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": 1}  # never half a file under the final name
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the temporary file is not the marker


def test_clear_run_dir_removes_the_marker_first_and_leaves_foreign_folders(tmp_path):
    run = tmp_path / "run"
    (run / "base").mkdir(parents=True)
    (run / "member_1").mkdir()
    (run / "notes").mkdir()
    for name in ("config.json", "metrics.json", "predictions.npz"):
        (run / name).write_text("x")
    removed = clear_run_dir(run, keep_sub_runs=True, log=lambda m: None)
    assert removed[0] == "metrics.json" and sorted(p.name for p in run.iterdir()) == ["base", "member_1", "notes"]
    clear_run_dir(run, keep_sub_runs=False, log=lambda m: None)  # not a run any more: nothing is touched
    (run / "config.json").write_text("x")
    clear_run_dir(run, keep_sub_runs=False, log=lambda m: None)
    assert sorted(p.name for p in run.iterdir()) == ["notes"]
    stranger = tmp_path / "home"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("x")
    assert clear_run_dir(stranger, keep_sub_runs=False) == [] and (stranger / "thesis.tex").exists()


def test_baseline_reuses_a_sub_run_only_when_its_config_matches(tmp_path, tiny_causal_lm_dir, capsys):
    task = write_bigbench_task(tmp_path / "task.json")
    out = tmp_path / "tfb"
    tfb = ["--method", "tfb", "--guide", "mle", "--tfb-anchor-size", "8", "--tfb-search-steps", "2"]
    main(_args(tiny_causal_lm_dir, task, out, *tfb))
    base_adapter = (out / "base" / "adapter.safetensors").read_bytes()
    capsys.readouterr()
    main(_args(tiny_causal_lm_dir, task, out, *tfb, "--overwrite", "--tfb-nll-tolerance", "0.05"))  # post-hoc field only
    assert "reusing the finished sub-run" in capsys.readouterr().out
    assert (out / "base" / "adapter.safetensors").read_bytes() == base_adapter
    main(_args(tiny_causal_lm_dir, task, out, *tfb, "--overwrite", "--lr", "0.01"))
    printed = capsys.readouterr().out
    assert "was trained with another config (--lr: run has 0.001, now 0.01): training it again" in printed
    assert json.loads((out / "base" / "config.json").read_text())["lr"] == 0.01
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01 and is_finished(out)
