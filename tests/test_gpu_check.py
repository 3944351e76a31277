"""benchmarks/gpu_check.py --tiny: the GPU check's code path on CPU with tiny shapes."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft", reason="the PEFT LoRA row needs peft (pip install -e '.[test]')")

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", _path)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
_spec.loader.exec_module(gpu_check)


def test_tiny_gpu_check_runs_every_row_on_cpu(capsys):
    rows = gpu_check.main(["--tiny", "--device", "cpu"])
    per_model = ["train peft_lora", "train mle", "train blob", "predictive_loop", "predictive_stacked"]
    assert [r["check"] for r in rows] == ["agreement"] + per_model * 2
    assert rows[0]["difference"] == 0.0  # CPU against itself
    for r in rows:
        if r["check"].startswith("train"):
            assert r["tokens_per_second"] > 0
        if r["check"].startswith("predictive"):
            assert r["difference"] <= 1e-5  # the stacked draws give the loop's probabilities
    printed = capsys.readouterr().out
    assert printed.count("\n| ") == len(rows) + 1  # one markdown table: header + a line per row
    assert "| predictive_stacked | tiny-1B-shaped (random weights) |" in printed


def test_without_cuda_the_full_check_asks_for_tiny():
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="no CUDA device; pass --tiny"):
        gpu_check.main([])
