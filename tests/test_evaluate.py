"""The evaluation CLI and library: the JSON contract, determinism, same images for every agent, early stops, seeds,
budgeted curves, the static reference, the Markdown leaderboard and the figures.

Runs 4-20 test images per agent; the checks hold for any checkpoint (no accuracy thresholds).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import gymnasium
import matplotlib.image as mpimg
import pytest
import torch

from agents import Agent, make_agent
from gfenv.cli import evaluate as evaluate_agent
from gfenv.env import GlanceFocusVectorEnv
from gfenv.eval.evaluation import evaluate, format_table
from gfenv.eval.leaderboard import budgeted_rows, markdown_report

ARGS = ["--agents", "random,center,oracle", "--episodes", "20", "--num-envs", "8", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, str]:
    path = tmp_path_factory.mktemp("eval") / "baselines.json"
    assert evaluate_agent.main([*ARGS, "--json", str(path)]) == 0
    return json.loads(path.read_text()), path.read_text()


def test_json_holds_the_contract_keys(report):
    data, _ = report
    assert data["env"] == "gfenv/GlanceFocus-v0" and data["episodes"] == 20 and data["seed"] == 3
    assert isinstance(data["env_kwargs"], dict) and list(data["agents"]) == ["random", "center", "oracle"]
    for result in data["agents"].values():
        steps = result["steps"]
        assert steps >= 2 and result["episodes"] == 20
        assert len(result["accuracy"]) == len(result["macs"]) == len(result["true_class_confidence"]) == steps
        assert all(0.0 <= a <= 100.0 for a in result["accuracy"])
        assert all(b > a for a, b in zip(result["macs"], result["macs"][1:]))
        assert all(0.0 <= c <= 1.0 for c in result["confidence"] + result["true_class_confidence"])


def test_same_seed_gives_identical_json(report, tmp_path):
    path = tmp_path / "again.json"
    assert evaluate_agent.main([*ARGS, "--json", str(path)]) == 0
    assert path.read_text() == report[1]


def test_oracle_is_at_least_as_confident_after_its_first_patch(report):
    agents = report[0]["agents"]
    oracle = agents["oracle"]["true_class_confidence"][1]
    assert oracle >= agents["random"]["true_class_confidence"][1] - 1e-6
    assert oracle >= agents["center"]["true_class_confidence"][1] - 1e-6
    assert agents["oracle"]["true_class_confidence"][0] == pytest.approx(agents["random"]["true_class_confidence"][0])


def test_batching_does_not_change_which_images_are_seen():
    one = evaluate({"center": make_agent("center")}, {"action": "grid"}, episodes=6, seed=0, num_envs=6,
                   progress=False)
    split = evaluate({"center": make_agent("center")}, {"action": "grid"}, episodes=6, seed=0, num_envs=4,
                     progress=False)
    for key in ("accuracy", "confidence", "true_class_confidence", "macs"):
        assert split["center"][key] == pytest.approx(one["center"][key], abs=1e-5)


class StopHalf(Agent):
    """Stops at once in even slots; odd slots take unvisited cells in order."""

    name = "stop-half"
    supported_actions = frozenset({"grid+stop"})
    macs_per_step = 1000

    def act(self, obs, env: GlanceFocusVectorEnv) -> torch.Tensor:
        cells = (~env.visited).float().argmax(1)
        even = torch.arange(env.num_envs, device=env.device) % 2 == 0
        return torch.where(even, env.grid ** 2, cells)


def test_early_stops_freeze_the_slot_and_count_policy_macs():
    env_kwargs = {"action": "grid+stop"}
    result = evaluate({"stop": StopHalf()}, env_kwargs, episodes=4, seed=0, num_envs=4, progress=False)["stop"]
    env = GlanceFocusVectorEnv(num_envs=1, action="grid+stop")
    steps = env.steps
    assert result["glimpses"] == pytest.approx([1 + k / 2 for k in range(steps)])
    expected = [env.glance_macs + k / 2 * env.focus_macs + (1 if k else 0) * 1000 / 2 + k / 2 * 1000
                for k in range(steps)]
    assert result["macs"] == pytest.approx(expected)


def test_agents_and_settings_are_checked_before_any_run():
    with pytest.raises(ValueError, match="action='grid\\+stop'"):
        evaluate({"stop": StopHalf()}, {}, episodes=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="split"):
        evaluate({"center": make_agent("center")}, {"split": "train"}, episodes=2, seed=0, progress=False)


def test_cli_refuses_unknown_agents_and_env_ids(capsys):
    with pytest.raises(SystemExit):
        evaluate_agent.main(["--agents", "random,nope"])
    err = capsys.readouterr().err
    assert "'nope'" in err and "oracle" in err and "center" in err
    assert evaluate_agent.main(["--env", "gfenv/Nope-v0"]) == 2
    assert "gfenv/GlanceFocus-v0" in capsys.readouterr().err


def test_table_has_agent_rows_and_a_macs_row(report):
    table = format_table(report[0]["agents"])
    lines = table.splitlines()
    assert any(line.startswith("oracle") for line in lines) and any(line.startswith("MACs (M)") for line in lines)
    assert "t=1" in table


# ----------------------------------------------------------------------------------------- the benchmark over seeds
BENCH = ["--agents", "random,center,oracle", "--seeds", "0,1", "--episodes", "12", "--num-envs", "6",
         "--threshold-episodes", "12", "--no-progress"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_module(name: str, **functions) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, fn in functions.items():
        setattr(module, key, fn)
    return module


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, dict, list]:
    """Two seeds, budgeted thresholds on 12 train images, a (stand-in) static model, every output file."""
    out = tmp_path_factory.mktemp("bench")
    calls = []

    def evaluate_static(checkpoint, env_kwargs, episodes, device="cpu", split="test"):
        calls.append((str(checkpoint), episodes, split))
        return {"accuracy": 88.0, "macs": 25_000_000, "episodes": episodes}

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "gfenv.train.static",
                   fake_module("gfenv.train.static", evaluate_static=evaluate_static))
        assert evaluate_agent.main([*BENCH, "--static", "static.pt", "--json", str(out / "bench.json"),
                                    "--markdown", str(out / "bench.md"), "--plots", str(out / "plots"),
                                    "--pictures", str(out / "patches.png"), "--picture-images", "2"]) == 0
    return out, json.loads((out / "bench.json").read_text()), calls


def test_several_seeds_report_the_mean_the_spread_and_each_seed(bench):
    _, data, _ = bench
    assert data["seeds"] == [0, 1] and data["seed"] == 0 and data["threshold_episodes"] == 12
    for label, result in data["agents"].items():
        steps = result["steps"]
        for key in ("accuracy", "accuracy_std", "macs", "macs_std", "score", "score_std", "confidence"):
            assert len(result[key]) == steps, (label, key)
        assert result["seeds"] == [0, 1] and set(result["per_seed"]) == {"0", "1"}
        runs = [result["per_seed"][s] for s in ("0", "1")]
        for t in range(steps):
            assert result["accuracy"][t] == pytest.approx((runs[0]["accuracy"][t] + runs[1]["accuracy"][t]) / 2)
    assert data["agents"]["center"]["accuracy_std"] == [0.0] * data["agents"]["center"]["steps"]


def test_the_score_is_zero_for_random_and_100_for_the_oracle(bench):
    agents = bench[1]["agents"]
    assert agents["random"]["score"][0] is None  # step 1 is the glance: oracle and random tie
    for t in range(1, agents["random"]["steps"]):
        if agents["oracle"]["accuracy"][t] != agents["random"]["accuracy"][t]:
            assert agents["random"]["score"][t] == pytest.approx(0.0)
            assert agents["oracle"]["score"][t] == pytest.approx(100.0)


def test_budgeted_curves_have_39_points_per_seed_and_their_mean(bench):
    for result in bench[1]["agents"].values():
        assert len(result["budgeted"]) == 39
        assert {"p", "macs", "macs_std", "accuracy", "accuracy_std"} <= set(result["budgeted"][0])
        for run in result["per_seed"].values():
            assert len(run["budgeted"]) == 39 and len(run["budgeted"][0]["thresholds"]) == result["steps"]
            assert run["budgeted"][0]["thresholds"][-1] is None  # -inf in JSON
        costs = [p["macs"] for p in result["budgeted"]]
        assert result["macs"][0] <= min(costs) and max(costs) <= result["macs"][-1]


def test_the_static_reference_is_evaluated_once_on_the_same_test_images(bench):
    out, data, calls = bench
    assert calls == [("static.pt", 12, "test")]
    assert data["static"] == {"checkpoint": "static.pt", "accuracy": 88.0, "macs": 25_000_000, "episodes": 12}
    assert "static (full image)" in (out / "bench.md").read_text()


def test_markdown_leaderboard_has_the_zoo_columns_and_a_row_per_agent(bench):
    text = (bench[0] / "bench.md").read_text()
    assert "|algo" in text and "|env_id" in text and "score_std" in text and "MACs (M)" in text
    rows = [line for line in text.splitlines() if line.startswith("|") and "gfenv/GlanceFocus-v0" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["random", "center", "oracle", "static (full image)"]
    assert "Budgeted batch classification" in text and "t=1" in text
    again = markdown_report("gfenv/GlanceFocus-v0", bench[1])  # from the JSON (NaN read back as null)
    assert again.count("|gfenv/GlanceFocus-v0|") == 4
    header, rows = budgeted_rows(bench[1]["agents"])
    for column in range(1, len(header) - 2):  # every budget shown is reached by some curve
        assert any(row[column] != "-" for row in rows)


def test_plots_and_pictures_are_png_files(bench):
    out = bench[0]
    for path in (out / "plots" / "anytime.png", out / "plots" / "budgeted.png", out / "patches.png"):
        assert path.stat().st_size > 0 and path.read_bytes()[:8] == PNG_SIGNATURE
        assert mpimg.imread(path).ndim == 3


def test_seed_and_seeds_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        evaluate_agent.main(["--seed", "1", "--seeds", "0,1"])
    assert "not allowed with" in capsys.readouterr().err


def _fake_runs(root: Path, seeds: tuple[int, ...], env: str = "gfenv/GlanceFocus-v0") -> None:
    for seed in seeds:
        (root / f"run_s{seed}").mkdir(parents=True)
        (root / f"run_s{seed}" / "config.yml").write_text(f"agent: ppo\nenv: {env}\ntimesteps: 1000\n")


def test_a_run_dir_template_loads_each_seed_s_own_run(tmp_path, monkeypatch, capsys):
    _fake_runs(tmp_path, (0, 1))
    loaded = []

    def fake_load(path, device="cpu"):
        loaded.append(Path(path).name)
        return make_agent("center")

    monkeypatch.setattr(evaluate_agent, "load_agent", fake_load)
    out = tmp_path / "eval.json"
    args = ["--episodes", "4", "--num-envs", "4", "--threshold-episodes", "0", "--no-progress"]
    assert evaluate_agent.main(["--agents", f"mine={tmp_path}/run_s{{seed}}", "--seeds", "0,1", *args,
                                "--json", str(out)]) == 0
    assert loaded == ["run_s0", "run_s1"]
    mine = json.loads(out.read_text())["agents"]["mine"]
    assert mine["run_dirs"] == [str(tmp_path / "run_s0"), str(tmp_path / "run_s1")] and mine["n_timesteps"] == 1000
    assert "budgeted" not in mine and "score" not in mine
    assert evaluate_agent.main(["--agents", f"mine={tmp_path}/run_s{{seed}}", "--seeds", "0,2", *args]) == 2
    assert "run_s2" in capsys.readouterr().err


def test_each_seed_is_scored_with_its_own_runs_stage_1_checkpoint(tmp_path, monkeypatch):
    from gfenv.checkpoint import load_model, save_model
    from gfenv.env import DEFAULT_CHECKPOINT

    model, meta = load_model(DEFAULT_CHECKPOINT)
    save_model(tmp_path / "s1_0.pt", model, meta)
    torch.nn.init.zeros_(model.classifier.head.weight)  # seed 1's classifier: always the class with the largest bias
    save_model(tmp_path / "s1_1.pt", model, meta)
    for seed in (0, 1):
        (tmp_path / f"run_s{seed}").mkdir()
        config = (f"agent: ppo\nenv: gfenv/GlanceFocus-v0\ntimesteps: 1000\n"
                  f"env_kwargs:\n  checkpoint: {tmp_path}/s1_{seed}.pt\n")
        (tmp_path / f"run_s{seed}" / "config.yml").write_text(config)
    monkeypatch.setattr(evaluate_agent, "load_agent", lambda path, device="cpu": make_agent("center"))
    args = ["--episodes", "24", "--num-envs", "12", "--threshold-episodes", "0", "--no-progress", "--seeds", "0,1"]
    out = tmp_path / "eval.json"
    assert evaluate_agent.main(["--agents", f"random,mine={tmp_path}/run_s{{seed}}", *args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [report["env_kwargs_per_seed"][s]["checkpoint"] for s in "01"] == [f"{tmp_path}/s1_{s}.pt" for s in "01"]
    for label in ("random", "mine"):  # the baselines see what each seed's run saw
        per_seed = report["agents"][label]["per_seed"]
        assert per_seed["0"]["accuracy"][0] > per_seed["1"]["accuracy"][0]
    # a template in --env-kwargs names each seed's checkpoint for runs that record none
    assert evaluate_agent.main(["--agents", "random", *args, "--env-kwargs", f"checkpoint={tmp_path}/s1_{{seed}}.pt",
                                "--json", str(out)]) == 0
    assert json.loads(out.read_text())["env_kwargs_per_seed"]["1"]["checkpoint"] == f"{tmp_path}/s1_1.pt"


@pytest.fixture
def extra_envs():
    """A short-episode variant of the default task, and one whose checkpoint is missing."""
    ids = {"gfenv/ShortTest-v0": {"steps": 3}, "gfenv/MissingTest-v0": {"checkpoint": "/nonexistent/model.pt"}}
    for env_id, kwargs in ids.items():
        gymnasium.register(env_id, entry_point="gfenv.env:GlanceFocusEnv",
                           vector_entry_point="gfenv.env:GlanceFocusVectorEnv", kwargs=kwargs)
    yield list(ids)
    for env_id in ids:
        gymnasium.registry.pop(env_id)


def test_leaderboard_has_a_row_per_agent_and_env_and_skips_what_is_missing(tmp_path, extra_envs, monkeypatch):
    _fake_runs(tmp_path, (0,), env="gfenv/ShortTest-v0")
    monkeypatch.setattr(evaluate_agent, "load_agent", lambda path, device="cpu": make_agent("center"))

    def evaluate_static(checkpoint, env_kwargs, episodes, device="cpu", split="test"):
        if env_kwargs.get("steps") == 3:
            raise ValueError("made for another task")
        return {"accuracy": 88.0, "macs": 25_000_000, "episodes": episodes}

    monkeypatch.setitem(sys.modules, "gfenv.train.static",
                        fake_module("gfenv.train.static", evaluate_static=evaluate_static))
    envs = ",".join(["gfenv/GlanceFocus-v0", *extra_envs])
    md = tmp_path / "board.md"
    assert evaluate_agent.main(["--leaderboard", "--envs", envs, "--agents", f"center,mine={tmp_path}/run_s{{seed}}",
                                "--episodes", "4", "--num-envs", "4", "--threshold-episodes", "0", "--no-progress",
                                "--static", "static.pt", "--markdown", str(md)]) == 0
    text = md.read_text()
    rows = {(r.split("|")[1].strip(), r.split("|")[2].strip()) for r in text.splitlines()
            if r.startswith("|") and "gfenv/" in r}
    both = ("gfenv/GlanceFocus-v0", "gfenv/ShortTest-v0")
    assert rows == ({(a, e) for a in ("random", "oracle", "center") for e in both}
                    | {("mine", "gfenv/ShortTest-v0"), ("static (full image)", "gfenv/GlanceFocus-v0")})
    for reason in ("gfenv/MissingTest-v0", "mine on gfenv/GlanceFocus-v0", "made for another task"):
        assert reason in text  # the skipped, with reasons


def test_gfnet_checkpoint_report_is_printed_and_its_errors_exit_2(monkeypatch, capsys):
    def report(path, data_root=None, device="cpu"):
        if path == "bad.pth.tar":
            raise ValueError("not a GFNet checkpoint")
        return f"report of {path} on {data_root} ({device})"

    monkeypatch.setitem(sys.modules, "gfenv.eval.official",
                        fake_module("gfenv.eval.official", gfnet_checkpoint_report=report))
    assert evaluate_agent.main(["--gfnet-checkpoint", "r50.pth.tar", "--data-root", "/data/imagenet"]) == 0
    assert "report of r50.pth.tar on /data/imagenet (cpu)" in capsys.readouterr().out
    assert evaluate_agent.main(["--gfnet-checkpoint", "bad.pth.tar"]) == 2
    assert "error: not a GFNet checkpoint" in capsys.readouterr().err


@pytest.fixture
def short_task():
    """A second embedded task: the default task's data and shipped encoders with episodes of T = 3."""
    from gfenv.task import TASKS, Task, register_task

    task = register_task(Task("gfenv/ShortSuiteTest-v0", {"steps": 3}, "test task", checkpoint="glyphs_small_cnn.pt"))
    yield task.env_id
    TASKS.pop(task.env_id)
    gymnasium.registry.pop(task.env_id)


def test_suite_scores_each_task_and_averages_them_per_agent(tmp_path, short_task, monkeypatch):
    _fake_runs(tmp_path / "GlanceFocus-v0", (0, 1))
    _fake_runs(tmp_path / "ShortSuiteTest-v0", (0, 1), env=short_task)
    monkeypatch.setattr(evaluate_agent, "load_agent", lambda path, device="cpu": StopHalf())
    out, md = tmp_path / "suite.json", tmp_path / "suite.md"
    assert evaluate_agent.main(["--suite", "--envs", f"gfenv/GlanceFocus-v0,{short_task}", "--agents",
                                f"center,raster,stopper={tmp_path}/{{env}}/run_s{{seed}}", "--seeds", "0,1",
                                "--episodes", "6", "--num-envs", "6", "--threshold-episodes", "0", "--no-progress",
                                "--json", str(out), "--markdown", str(md)]) == 0
    report = json.loads(out.read_text())
    assert set(report["envs"]) == {"gfenv/GlanceFocus-v0", short_task}
    assert len(report["envs"][short_task]["agents"]["center"]["accuracy"]) == 3
    suite = report["suite"]
    assert set(suite) == {"random", "oracle", "center", "raster"}  # stopper needs grid+stop: skipped, not a crash
    for label in ("center", "raster"):
        per_task = [report["envs"][e]["agents"][label]["per_seed"] for e in report["envs"]]
        expected = [sum(t[s]["score"][-1] for t in per_task) / 2 for s in ("0", "1")]
        assert suite[label]["per_seed"] == pytest.approx(dict(zip(("0", "1"), expected)))
        assert suite[label]["score"] == pytest.approx(sum(expected) / 2)
    assert suite["oracle"]["score"] == pytest.approx(100.0) and suite["random"]["score"] == pytest.approx(0.0)
    text = md.read_text()
    assert "## Suite score" in text and "stopper on gfenv/GlanceFocus-v0" in text and "grid+stop" in text


@pytest.mark.parametrize(("envs", "named"), [
    ("gfenv/Nope-v0", "Unknown task 'gfenv/Nope-v0'"),
    ("gfenv/GlanceFocus-v0,gfenv/ClutteredMNIST60-v0", "gfenv/ClutteredMNIST60-v0 cannot join the suite"),
])
def test_suite_refuses_a_task_it_cannot_run_before_running_anything(tmp_path, capsys, envs, named):
    md = tmp_path / "suite.md"
    assert evaluate_agent.main(["--suite", "--envs", envs, "--episodes", "4", "--no-progress",
                                "--markdown", str(md)]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1 and not md.exists()


def test_import_option_brings_a_users_registered_agent_to_the_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_gfenv_agents.py").write_text(
        "from agents import Agent, register_agent\n\n"
        "@register_agent('first_free_test')\n"
        "class FirstFree(Agent):\n"
        "    name, supported_actions = 'first_free_test', frozenset({'grid'})\n\n"
        "    def act(self, obs, env):\n"
        "        return (~env.visited).float().argmax(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "eval.json"
    args = ["--agents", "first_free_test", "--env-kwargs", "action=grid", "--episodes", "4", "--num-envs", "4",
            "--threshold-episodes", "0", "--no-progress", "--json", str(out)]
    try:
        assert evaluate_agent.main(["--import", "my_gfenv_agents", *args]) == 0
        assert "first_free_test" in json.loads(out.read_text())["agents"]
    finally:
        from agents import AGENTS

        AGENTS.pop("first_free_test", None)
    assert evaluate_agent.main(["--import", "no_such_module_here", *args]) == 2
    assert "--import no_such_module_here" in capsys.readouterr().err
