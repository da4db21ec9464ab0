"""benchmarks/gpu_speed.py, the GPU speed table, runs end to end on a tiny DiT on the CPU."""

from pathlib import Path

from conftest import load_script

from dumo.training import compiling

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_speed_table_runs_tiny_on_the_cpu(capsys, monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", compiling.BACKEND)  # the script sets it: restored after the test
    speed = load_script(BENCHMARKS / "gpu_speed.py")
    assert speed.main(["--tiny", "--device", "cpu", "--backend", "aot_eager", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| DiT-S/2")]
    assert len(rows) == len(speed.tiny_plan())
    for cells in rows:
        images_per_sec, step_ms, tflops, mfu, memory = (cell.strip() for cell in cells[5:10])
        assert float(images_per_sec) > 0 and float(step_ms) > 0 and float(tflops) > 0, cells
        assert mfu == "-" and memory == "-"  # no peak FLOP/s nor CUDA memory on the CPU
    assert {cells[3].strip() for cells in rows} == {"eager", "blocks, checkpointed blocks"}
    assert "| flow_map_sample, 1 step |" in out and "skipped" not in out
