"""python -m gfenv.bench: every measure and ratio lands in the JSON, on a tiny setting."""

from __future__ import annotations

import json

import pytest

from gfenv import bench as bench_lib
from gfenv.cli import bench


def test_bench_cli_writes_every_measure_and_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--num-envs", "4", "--repeats", "1", "--episodes", "1", "--cache-images", "8", "--cycles",
                       "2", "--threads", "1", "--imports", "1", "--single-episodes", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in (*(k for k in bench.KEYS if k != "imports"), "batched_over_per_env", "floor_over_batched",
                "cached_over_batched", "sb3_ppo_over_batched", "sb3_ppo_tiny_over_batched",
                "sb3_ppo_collect_over_batched"):
        assert report[key] > 0, key
    assert report["imports"]["gfenv_over_torch"] > 0 and len(report["imports"]["ratios"]) == 1
    assert report["threads"] == 1 and report["num_envs"] == 4 and report["device"] == "cpu"
    paired = report["details"]["floor_over_batched"]  # one ratio per round (1 run each) of each of the 2 cycles
    assert len(paired) == 2 and report["floor_over_batched"] == pytest.approx(sum(paired) / 2)
    runs = report["details"]["seconds_per_run"]
    # per_env in every cycle, each of its (2) runs next to a batched run of its own
    assert len(runs) == 2 and all(len(c["per_env"]) == len(c["batched@per_env"]) == 2 for c in runs)
    assert len(report["details"]["batched_over_per_env"]) == 4  # 2 side-by-side pairs in each of the 2 cycles
    # PPO's share of the env's rate pairs each PPO run with the batched run next to it
    for slow in ("sb3_ppo", "sb3_ppo_collect", "sb3_ppo_tiny"):
        assert all(len(c[slow]) == len(c[f"batched@{slow}"]) == 2 for c in runs)
        steps = {k: report["details"][k]["steps_per_repeat"] for k in (slow, "batched")}
        expected = [(steps[slow] / t) / (steps["batched"] / b)
                    for c in runs for t, b in zip(c[slow], c[f"batched@{slow}"], strict=True)]
        assert report["details"][f"{slow}_over_batched"] == pytest.approx(expected)
    assert report["details"]["batched"]["steps_per_repeat"] == 4 * 4  # N slots x (T - 1) steps
    printed = capsys.readouterr().out
    assert "batched_over_per_env" in printed and "target >= 30" in printed and "import_gfenv_over_torch" in printed


def test_slow_measures_are_timed_next_to_their_partner_in_every_cycle():
    clock = {"t": 0.0}
    cost = {"fast": 1.0, "slow": 10.0}
    order = []

    def workload(name):
        def run():
            order.append(name)
            clock["t"] += cost[name]
        return bench_lib.Workload(run, 1)

    real = bench_lib.time.perf_counter
    bench_lib.time.perf_counter = lambda: clock["t"]
    try:
        cycles = bench_lib.time_rounds({"fast": workload("fast"), "slow": workload("slow")}, repeats=3, cycles=2,
                                       device=bench_lib.torch.device("cpu"), slow=("slow",),
                                       partners={"slow": "fast"})
    finally:
        bench_lib.time.perf_counter = real
    for cycle in cycles:
        assert cycle["fast"] == [1.0] * 3 and cycle["slow"] == [10.0] * 2 and cycle["fast@slow"] == [1.0] * 2
    # warm-up, 3 fast rounds, then slow/fast, fast/slow: the pairs are adjacent
    assert order[:9] == ["fast", "slow", "fast", "fast", "fast", "slow", "fast", "fast", "slow"]


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
