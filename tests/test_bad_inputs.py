"""Validate before writing: a matrix of bad inputs to train, evaluate, compare and export. Each must fail
with a message that says what was expected, what was found and what to do, and leave the output
directory absent (a new one) or byte-for-byte unchanged (an existing one)."""

import json

import pytest
import torch

from blob_pyro import compare
from blob_pyro.evaluate import main as evaluate_main
from blob_pyro.export import main as export_main
from blob_pyro.train import main as train_main
from tests.conftest import write_bigbench_task


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_causal_lm_dir):
    root = tmp_path_factory.mktemp("bad_inputs")
    task = write_bigbench_task(root / "task.json")
    run = root / "run"
    train_main(["--model", str(tiny_causal_lm_dir), "--task", str(task), "--output-dir", str(run), "--num-train", "16",
                "--num-validation", "8", "--max-steps", "2", "--batch-size", "4", "--eval-samples", "2", "--eval-batch-size", "8",
                "--rank", "2", "--no-zero-shot", "--device", "cpu"])
    (root / "a_file").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "not_json.json").write_text("{not json")
    (root / "no_keys.json").write_text(json.dumps({"train": [0, 1]}))
    unfinished = root / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((run / "config.json").read_text())
    garbage = root / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{oops")
    (garbage / "metrics.json").write_text("{}")
    moved = root / "moved_model"
    moved.mkdir()
    (moved / "config.json").write_text(json.dumps({**json.loads((run / "config.json").read_text()), "model": str(root / "deleted_model")}))
    (moved / "metrics.json").write_text("{}")
    evaluation = root / "evaluation_done"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text("{}")
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    return {"root": root, "model": tiny_causal_lm_dir, "task": task, "run": run}


def train_args(e, out, *extra):
    return ["--model", str(e["model"]), "--task", str(e["task"]), "--output-dir", str(out), "--num-train", "16",
            "--num-validation", "8", "--max-steps", "2", "--batch-size", "4", "--eval-samples", "2", "--eval-batch-size", "8",
            "--rank", "2", "--no-zero-shot", "--device", "cpu", *extra]


def cmp_args(e, *extra):
    """Flags compare passes to every run (no --output-dir / --seed: compare sets them)."""
    return ["--model", str(e["model"]), "--task", str(e["task"]), "--num-train", "16", "--num-validation", "8", "--max-steps", "2",
            "--rank", "2", "--no-zero-shot", "--device", "cpu", *extra]


def _replace(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
R = lambda e: e["root"]  # noqa: E731

# (id, tool, argv(env, out), out(env) or None for a fresh folder, message regex: expected .* found .* what to do)
CASES = [
    # --- train: checks that need no model ---
    ("train-missing-task", "train", lambda e, o: _replace(train_args(e, o), "--task", str(R(e) / "nope.json")), None,
     r"--task '.*nope.json' cannot be loaded: task .* is not a file; pass a BIG-bench JSON file"),
    ("train-unknown-bundled-task", "train", lambda e, o: _replace(train_args(e, o), "--task", "bundled:nothing"), None,
     r"--task 'bundled:nothing' cannot be loaded: no bundled task 'nothing'; bundled tasks: "),
    ("train-task-is-folder", "train", lambda e, o: _replace(train_args(e, o), "--task", str(R(e) / "empty")), None,
     r"--task '.*empty' cannot be loaded: task .* is not a file; pass a BIG-bench JSON file"),
    ("train-missing-split-file", "train", lambda e, o: train_args(e, o, "--split-file", str(R(e) / "nope_split.json")), None,
     r"--split-file '.*nope_split.json': expected a JSON file with 'train' and 'validation' index lists, found no such file; "
     r"pass an existing split file or drop --split-file"),
    ("train-split-file-not-json", "train", lambda e, o: train_args(e, o, "--split-file", str(R(e) / "not_json.json")), None,
     r"--split-file '.*not_json.json' does not fit task 'colours': .* is not valid JSON .*expected a split file"),
    ("train-split-file-without-keys", "train", lambda e, o: train_args(e, o, "--split-file", str(R(e) / "no_keys.json")), None,
     r"does not fit task 'colours': .* lacks \['validation', 'procedure'\]; a split file needs 'train' and 'validation'"),
    pytest.param("train-cuda-without-gpu", "train", lambda e, o: _replace(train_args(e, o), "--device", "cuda"), None,
                 r"--device cuda: expected a device this machine has, found no CUDA GPU .*; use --device cpu or auto",
                 marks=NO_GPU),
    ("train-unknown-device", "train", lambda e, o: _replace(train_args(e, o), "--device", "gpu"), None,
     r"--device 'gpu': expected auto, cpu or cuda\[:i\], found an unknown device .*; use --device cpu or auto"),
    ("train-missing-model-path", "train", lambda e, o: _replace(train_args(e, o), "--model", str(R(e) / "no_model")), None,
     r"--model '.*no_model': Model spec .* looks like a local path, but .* does not exist\. Pass a directory written by save_pretrained"),
    ("train-model-folder-without-config", "train", lambda e, o: _replace(train_args(e, o), "--model", str(R(e) / "empty")), None,
     r"expected a folder written by save_pretrained \(with config.json\), found .*empty without config.json; pass the folder"),
    ("train-too-many-validation", "train", lambda e, o: _replace(train_args(e, o), "--num-validation", "100"), None,
     r"--num-train 16 / --num-validation 100 do not fit task 'colours' \(40 examples\): num_train \+ num_validation = 116 "
     r"exceeds the 40 available examples; reduce num_train or num_validation"),
    ("train-too-many-train", "train", lambda e, o: _replace(train_args(e, o), "--num-train", "40"), None,
     r"--num-train 40 / --num-validation 8 do not fit task 'colours' \(40 examples\): .* exceeds the 40 available examples"),
    ("train-missing-eval-task", "train", lambda e, o: train_args(e, o, "--eval-tasks", str(R(e) / "nope_ood.json")), None,
     r"--eval-tasks '.*nope_ood.json' cannot be loaded: task .* is not a file; pass a BIG-bench JSON file"),
    ("train-eval-task-is-the-training-task", "train", lambda e, o: train_args(e, o, "--eval-tasks", str(e["task"])), None,
     r"--eval-tasks names 'task' twice or names the training task; expected each other task once: remove the repeat"),
    ("train-eval-task-twice", "train", lambda e, o: train_args(e, o, "--eval-tasks", "bundled:social_iqa,bundled:social_iqa"), None,
     r"--eval-tasks names 'social_iqa' twice .*expected each other task once: remove the repeat"),
    ("train-output-dir-is-a-file", "train", lambda e, o: train_args(e, R(e) / "a_file"), lambda e: R(e) / "a_file",
     r"--output-dir .*a_file: expected a directory \(or a path to create\), found a file; choose another --output-dir"),
    ("train-finished-run-without-overwrite", "train", lambda e, o: train_args(e, e["run"]), lambda e: e["run"],
     r"--output-dir .*run already holds a finished run \(metrics.json\); pass --overwrite to replace it or choose another"),
    ("train-resume-without-checkpoint", "train", lambda e, o: train_args(e, o, "--resume"), None,
     r"--resume: expected a checkpoint to continue from, but .* holds no checkpoint.safetensors; run without --resume"),
    ("train-resume-a-finished-run", "train", lambda e, o: train_args(e, e["run"], "--resume"), lambda e: e["run"],
     r"expected a checkpoint to continue from, but .*run holds no checkpoint.safetensors \(it holds metrics.json: the run has "
     r"finished\); run without --resume"),
    ("train-missing-base-run", "train", lambda e, o: train_args(e, o, "--method", "tfb", "--guide", "mle", "--base-run", str(R(e) / "empty")),
     None, r"--base-run .*empty: no config.json; point it at a finished python -m blob_pyro.train run directory"),
    ("train-post-hoc-on-a-bayesian-guide", "train", lambda e, o: train_args(e, o, "--method", "tfb", "--guide", "blob", "--base-run", str(e["run"])),
     None, r"--method tfb is post-hoc on a point estimate: use --guide map or mle, got --guide blob"),
    ("train-base-run-other-rank", "train",
     lambda e, o: _replace(train_args(e, o, "--method", "ensemble", "--guide", "blob", "--base-run", str(e["run"])), "--rank", "4"),
     None, r"--base-run .*run does not match this run \(rank: run has 2, this run needs 4\); rerun it with those values or drop --base-run"),
    ("train-unknown-paper-task", "train", lambda e, o: _replace(train_args(e, o), "--task", "paper:nope"), None,
     r"unknown paper task 'nope'; paper tasks are \['arc_challenge', .*\] \(use paper:<name>\)"),
    ("train-mc-dropout-without-dropout", "train", lambda e, o: train_args(e, o, "--method", "mc_dropout", "--guide", "mle"), None,
     r"--method mc_dropout needs dropout to sample from: pass --lora-dropout 0.1"),
    # --- train: checks that need the model, still before any run file ---
    ("train-target-module-not-in-model", "train", lambda e, o: train_args(e, o, "--target-modules", "qkv"), None,
     r"matched no nn.Linear layer.*q_proj"),
    # --- evaluate ---
    ("evaluate-missing-run", "evaluate", lambda e, o: ["--run-dir", str(R(e) / "no_run"), "--output-dir", str(o)], None,
     r"--run-dir .*no_run: expected the --output-dir of a training run, found no such directory"),
    ("evaluate-run-dir-is-a-file", "evaluate", lambda e, o: ["--run-dir", str(R(e) / "a_file"), "--output-dir", str(o)], None,
     r"--run-dir .*a_file: expected a run directory, found a file; pass the --output-dir of a training run"),
    ("evaluate-not-a-run", "evaluate", lambda e, o: ["--run-dir", str(R(e) / "empty"), "--output-dir", str(o)], None,
     r"expected config.json, found none: it is not a directory written by python -m blob_pyro.train; pass the --output-dir"),
    ("evaluate-unfinished-run", "evaluate", lambda e, o: ["--run-dir", str(R(e) / "unfinished")], lambda e: R(e) / "unfinished",
     r"expected a finished run \(metrics.json\), found none: the run is unfinished or failed; finish it \(--resume"),
    ("evaluate-unreadable-config", "evaluate", lambda e, o: ["--run-dir", str(R(e) / "garbage"), "--output-dir", str(o)], None,
     r"config.json is unreadable \(.*\); rerun the training run"),
    ("evaluate-run-model-gone", "evaluate", lambda e, o: ["--run-dir", str(R(e) / "moved_model"), "--output-dir", str(o)], None,
     r"the run's --model \(config.json of .*moved_model\) '.*deleted_model': Model spec .* does not exist\. Pass a directory"),
    ("evaluate-earlier-evaluation", "evaluate", lambda e, o: ["--run-dir", str(e["run"]), "--output-dir", str(R(e) / "evaluation_done")],
     lambda e: R(e) / "evaluation_done",
     r"--output-dir .*evaluation_done already holds an evaluation \(metrics.json\); pass --overwrite to replace it or choose another"),
    pytest.param("evaluate-cuda-without-gpu", "evaluate", lambda e, o: ["--run-dir", str(e["run"]), "--output-dir", str(o), "--device", "cuda"],
                 None, r"--device cuda: expected a device this machine has, found no CUDA GPU", marks=NO_GPU),
    ("evaluate-missing-eval-task", "evaluate",
     lambda e, o: ["--run-dir", str(e["run"]), "--output-dir", str(o), "--eval-tasks", f"run,{R(e) / 'nope_ood.json'}"], None,
     r"--eval-tasks '.*nope_ood.json' cannot be loaded: task .* is not a file; pass a BIG-bench JSON file"),
    ("evaluate-output-dir-is-a-file", "evaluate", lambda e, o: ["--run-dir", str(e["run"]), "--output-dir", str(R(e) / "a_file")],
     lambda e: R(e) / "a_file", r"--output-dir .*a_file: expected a directory \(or a path to create\), found a file"),
    # --- compare ---
    ("compare-unknown-method", "compare", lambda e, o: ["--methods", "bbb", "--output-dir", str(o)], None,
     r"unknown method 'bbb'; valid: .* or an autoguide 'module:Class'"),
    ("compare-bad-train-flag", "compare", lambda e, o: ["--methods", "mle", "--output-dir", str(o), "--rank", "0"], None,
     r"\[compare\] method mle: python -m blob_pyro.train: error: --rank must be a positive integer, got 0"),
    ("compare-missing-task", "compare",
     lambda e, o: ["--methods", "mle,tfb", "--output-dir", str(o), *_replace(cmp_args(e), "--task", str(R(e) / "nope.json"))],
     None, r"\[compare\] method mle: --task '.*nope.json' cannot be loaded: task .* is not a file; pass a BIG-bench JSON file"),
    ("compare-too-many-validation", "compare",
     lambda e, o: ["--methods", "mle", "--output-dir", str(o), *_replace(cmp_args(e), "--num-validation", "100")], None,
     r"\[compare\] method mle: --num-train 16 / --num-validation 100 do not fit task 'colours' \(40 examples\)"),
    ("compare-missing-model", "compare",
     lambda e, o: ["--methods", "laplace", "--output-dir", str(o), "--model", str(R(e) / "no_model"), "--task", str(e["task"])], None,
     r"\[compare\] method laplace: --model '.*no_model': Model spec .* does not exist\. Pass a directory"),
    ("compare-missing-eval-task", "compare",
     lambda e, o: ["--methods", "ensemble", "--output-dir", str(o), *cmp_args(e, "--eval-tasks", str(R(e) / "nope_ood.json"))], None,
     r"\[compare\] method ensemble: --eval-tasks '.*nope_ood.json' cannot be loaded"),
    ("compare-output-dir-is-a-file", "compare", lambda e, o: ["--methods", "mle", "--output-dir", str(R(e) / "a_file")],
     lambda e: R(e) / "a_file", r"--output-dir .*a_file: expected a directory \(or a path to create\), found a file"),
    # --- export ---
    ("export-missing-run", "export", lambda e, o: ["--run-dir", str(R(e) / "no_run"), "--output-dir", str(o)], None,
     r"--run-dir .*no_run does not exist; pass the --output-dir of a finished training run"),
    ("export-not-a-run", "export", lambda e, o: ["--run-dir", str(R(e) / "empty"), "--output-dir", str(o)], None,
     r"--run-dir .*empty: no config.json; expected the --output-dir of a python -m blob_pyro.train run"),
    ("export-unfinished-run", "export", lambda e, o: ["--run-dir", str(R(e) / "unfinished"), "--output-dir", str(o)], None,
     r"the run is not finished \(no metrics.json\); wait for it to finish or rerun it"),
    ("export-existing-adapter", "export", lambda e, o: ["--run-dir", str(e["run"]), "--output-dir", str(R(e) / "adapter")],
     lambda e: R(e) / "adapter", r"--output-dir .*adapter already holds an adapter \(adapter_config.json\); pass --overwrite"),
    ("export-output-is-a-file", "export", lambda e, o: ["--run-dir", str(e["run"]), "--output-dir", str(R(e) / "a_file")],
     lambda e: R(e) / "a_file", r"--output-dir .*a_file: expected a folder for the adapter, found a file; choose another"),
    pytest.param("export-cuda-without-gpu", "export", lambda e, o: ["--run-dir", str(e["run"]), "--output-dir", str(o), "--device", "cuda"],
                 None, r"--device cuda: expected a device this machine has, found no CUDA GPU", marks=NO_GPU),
    ("export-no-run-dir", "export", lambda e, o: ["--output-dir", str(o)], None, r"--run-dir is required: the directory of a finished training run"),
]
MAINS = {"train": train_main, "evaluate": evaluate_main, "compare": compare.main, "export": export_main}


def _snapshot(path):
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def _case_id(case):
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("case_id, tool, argv, existing, message", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_fails_before_writing(env, tmp_path, case_id, tool, argv, existing, message):
    out = existing(env) if existing else tmp_path / "out"
    watched = [out, env["run"]]
    before = [_snapshot(p) for p in watched]
    with pytest.raises((SystemExit, ValueError)) as raised:
        MAINS[tool](argv(env, out))
    text = str(raised.value)
    assert __import__("re").search(message, text), f"message of {case_id!r} does not match {message!r}:\n{text}"
    assert "Traceback" not in text
    assert [_snapshot(p) for p in watched] == before  # absent stays absent, an existing folder is unchanged


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 30
    assert {c[1] if not hasattr(c, "values") else c.values[1] for c in CASES} == set(MAINS)
