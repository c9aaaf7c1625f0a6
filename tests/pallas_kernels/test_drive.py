"""``python -m pallas_kernels.drive`` (the profiler driver) runs and reports a time per call."""

from pallas_kernels import drive


def test_drive_runs_one_projection(capsys):
    drive.main(["--shape", "ernie45_21b", "--proj", "down", "--tokens", "1", "--calls", "1",
                "--config", "16,32,128,4,mma_gs,1"])
    out = capsys.readouterr().out
    assert "ernie45_21b down tokens=1" in out and "us per call" in out


def test_drive_runs_the_whole_ffn(capsys):
    drive.main(["--shape", "ernie45_21b", "--proj", "ffn", "--tokens", "1", "--calls", "1",
                "--config", "16,32,128,4,mma_gs,1"])
    out = capsys.readouterr().out
    assert "ernie45_21b ffn tokens=1" in out and "us per call" in out
