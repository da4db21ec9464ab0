import subprocess
import sys

import pytest


def demo(*args):
    return subprocess.run([sys.executable, "-m", "dumo", "demo", *map(str, args)], capture_output=True, text=True)


def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    result = demo("--out", out, "--steps", 30, "--set", "train.progress=false")
    assert result.returncode == 0, result.stderr
    assert "1 NFE  MMD" in result.stdout and "2 NFE  MMD" in result.stdout
    assert (out / "samples.png").read_bytes()[:4] == b"\x89PNG"
    # a second demo replaces the first; a folder that is not a demo is left alone
    assert demo("--out", out, "--steps", 5, "--set", "train.progress=false").returncode == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    result = demo("--out", other, "--steps", 5)
    assert result.returncode == 2 and "not made by 'dumo demo'" in result.stderr
    assert (other / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_demo_reaches_a_useful_one_step_quality(tmp_path):
    """The full demo: DuMo's 1-NFE samples on moons beat a clearly broken model by a wide margin."""
    result = demo("--out", tmp_path / "demo", "--set", "train.progress=false")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("1 NFE"))
    assert float(line.split("MMD")[1].split()[0]) < 0.2, result.stdout


def test_demo_prints_the_same_numbers_whatever_the_threads_in_the_environment(tmp_path):
    """The demo pins itself to one CPU thread, so OMP_NUM_THREADS (or the core count) no longer
    changes the figures a newcomer sees; without the pin 1 and 2 threads differ after 200 steps."""
    import os

    printed = []
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        command = [sys.executable, "-m", "dumo", "demo", "--out", str(tmp_path / threads), "--steps", "200"]
        result = subprocess.run(command + ["--set", "train.progress=false"], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        printed.append([line for line in result.stdout.splitlines() if "MMD" in line])
    assert len(printed[0]) == 3 and printed[0] == printed[1]
