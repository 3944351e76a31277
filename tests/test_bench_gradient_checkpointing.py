"""benchmarks/bench_gradient_checkpointing.py on a small random Llama: the table it prints, and that the flag
really shrinks what a training step allocates (the peak-RSS measurement of the benchmark)."""

import importlib.util
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gradient_checkpointing.py"
_spec = importlib.util.spec_from_file_location("bench_gradient_checkpointing", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.slow  # ~30-60 s: four fresh interpreters (one per row)
def _can_reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:  # not Linux, or a container that refuses the write
        return False


@pytest.mark.skipif(not _can_reset_peak_rss(), reason="needs a writable /proc/self/clear_refs (Linux)")
def test_checkpointing_rows_allocate_less_per_step(capsys):
    bench.main(["--layers", "6", "--seq-len", "128", "--repeats", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]
    assert [(r[0], r[1]) for r in rows] == [(label, "yes" if on else "no") for label, _, _, on in bench.ROWS]
    memory_ratio = {(r[0], r[1]): float(r[5].rstrip("x")) for r in rows}
    for label in ("LoRA (MLE)", "BLoB, token flipout"):
        assert memory_ratio[(label, "no")] == 1.0
        # 6 layers: checkpointing keeps the layer inputs and one layer's activations (measured ~0.3x)
        assert memory_ratio[(label, "yes")] < 0.6, (label, memory_ratio)
