"""benchmarks/native_clip.py and native_cpu.py run end to end on a tiny workload (timing kept
to the fewest rounds), print every table they promise and put GRADSTATS_BACKEND back."""
import os

import pytest

from benchmarks import timing, workloads
from gradstats import backend, native

pytestmark = pytest.mark.skipif(not native.available(), reason="no native layer")

TINY = "tiny"


@pytest.fixture
def tiny_workload(monkeypatch):
    monkeypatch.setitem(workloads.WORKLOADS, TINY, lambda: [(8, 4), (3,), (5, 2, 2)])
    monkeypatch.setattr(timing, "MIN_ROUNDS", 2)
    monkeypatch.setattr(timing, "MAX_ROUNDS", 2)
    monkeypatch.setattr(timing, "MIN_SECONDS", 0.0)
    monkeypatch.setenv(backend.BACKEND_ENV, "reference")


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith(f"| {first_cell} |")]


def test_native_clip_pairs_each_dtype_with_torch_and_bf16_with_fp32_per_byte(
        tiny_workload, tmp_path, capsys):
    from benchmarks import native_clip

    out = tmp_path / "clip.md"
    native_clip.main(["--workloads", TINY, "--dtypes", "fp32,bf16", "--out", str(out)])
    assert os.environ[backend.BACKEND_ENV] == "reference"
    text = out.read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    rows = _table_rows(text, TINY)
    against_torch = [row for row in rows if row[1] in ("fp32", "bf16")]
    assert len(against_torch) == 6  # three cases per dtype
    per_byte = [row for row in rows if row[1] not in ("fp32", "bf16")]
    assert [row[1] for row in per_byte] == ["clip_grad_norm_, no clipping needed",
                                            "clip_grads_with_norm_ (scale only)"]
    # fp32 (8*4 + 3 + 5*2*2) * 4 bytes; bf16 twice the first dimension, 2 bytes each
    assert all(float(row[2]) == pytest.approx(55 * 4 / 1e6, rel=1e-3) for row in per_byte)
    assert all(float(row[5]) > 0 for row in rows)  # every ratio measured

    native_clip.main(["--workloads", TINY, "--dtypes", "fp32", "--no-per-byte"])
    assert "per byte" not in capsys.readouterr().out


def test_native_cpu_pairs_every_case_with_the_sum(tiny_workload, capsys, monkeypatch):
    from benchmarks import native_cpu

    monkeypatch.setattr(native_cpu, "LOOP_ROUNDS", 1)
    native_cpu.main(["--workloads", TINY, "--dtypes", "bf16"])
    assert os.environ[backend.BACKEND_ENV] == "reference"
    cases = [row[2] for row in _table_rows(capsys.readouterr().out, TINY)]
    assert cases == ["stats + histogram", "stats only", "collecting the gradients alone"]
