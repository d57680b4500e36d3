"""python -m gfenv.bench: every measure and ratio lands in the JSON, on a tiny setting."""

from __future__ import annotations

import json

import pytest

from gfenv import bench as bench_lib
from gfenv.cli import bench


def test_bench_cli_writes_every_measure_and_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--num-envs", "4", "--repeats", "1", "--episodes", "1", "--cache-images", "8", "--cycles",
                       "2", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in (*bench.KEYS, "batched_over_per_env", "floor_over_batched", "cached_over_batched"):
        assert report[key] > 0, key
    assert report["threads"] == 1 and report["num_envs"] == 4 and report["device"] == "cpu"
    paired = report["details"]["floor_over_batched"]  # one ratio per round (1 run each) of each of the 2 cycles
    assert len(paired) == 2 and report["floor_over_batched"] == pytest.approx(sum(paired) / 2)
    runs = report["details"]["seconds_per_run"]
    assert len(runs) == 2 and len(runs[0]["batched"]) == 1 and "per_env" not in runs[1]
    assert len(report["details"]["batched_over_per_env"]) == 1  # per_env runs in the first cycle only
    assert report["details"]["batched"]["steps_per_repeat"] == 4 * 4  # N slots x (T - 1) steps
    printed = capsys.readouterr().out
    assert "batched_over_per_env" in printed and "target >= 30" in printed


def test_bench_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--skip", "warp"])
    assert "Unknown measure" in capsys.readouterr().err
    if not bench.torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.main(["--device", "cuda"])
        assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--cycles", "0"])
    assert "--cycles: '0': must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--device cuda"):
        bench_lib.bench_memory(bench_lib.torch.device("cpu"))
