"""Stage 2 through the real CLI (``train_agent.main``): every SB3 agent trains on a tiny budget and leaves a loadable
model; evaluation, checkpoints, resume, Ctrl-C, seeding, hyperparameter overrides and the user errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from agents import SB3_SPECS, SB3Agent
from gfenv import GlanceFocusVectorEnv
from gfenv.cli import evaluate as evaluate_agent
from gfenv.cli import train as train_agent
from gfenv.sb3 import SB3VecEnv
from gfenv.train.runs import load_agent
from gfenv.train.stage2 import HYPERPARAMS_DIR, PolicyTrainingConfig, resolve_config

QUIET = ["--no-progress", "--eval-freq", "-1", "--checkpoint-freq", "0"]
PPO_TINY = ["n_steps=8", "batch_size=32", "n_epochs=1"]
TINY = {"ppo": PPO_TINY, "maskable_ppo": PPO_TINY, "open_loop": PPO_TINY, "recurrent_ppo": PPO_TINY,
        "a2c": ["n_steps=8"],
        "trpo": ["n_steps=8", "batch_size=32", "n_critic_updates=1"], "ars": ["n_delta=2", "n_top=2"],
        "sac": ["learning_starts=16", "buffer_size=512", "batch_size=16"],
        "qrdqn": ["learning_starts=16", "buffer_size=512", "batch_size=16"]}


def _train(run_dir, agent="ppo", timesteps=64, extra=(), hyperparams=None) -> int:
    hp = TINY[agent] if hyperparams is None else hyperparams
    return train_agent.main(["--stage", "2", "--agent", agent, "--timesteps", str(timesteps), "--num-envs", "4",
                             "--run-dir", str(run_dir), *QUIET, *extra, "--hyperparams", *hp])


def _params(path) -> dict[str, torch.Tensor]:
    return SB3Agent.load(path).model.policy.state_dict()


@pytest.mark.parametrize("agent", sorted(SB3_SPECS))
def test_each_sb3_agent_trains_through_the_cli_and_leaves_a_loadable_model(tmp_path, agent):
    assert _train(tmp_path, agent) == 0
    config = yaml.safe_load((tmp_path / "config.yml").read_text())
    assert config["agent"] == agent and config["seed"] == 0 and config["num_envs"] == 4
    assert config["env_kwargs"]["action"] in SB3_SPECS[agent].supported_actions
    loaded = load_agent(tmp_path)
    assert loaded.name == agent and 64 <= loaded.num_timesteps <= 96 and (tmp_path / "last.zip").is_file()
    env = GlanceFocusVectorEnv(num_envs=2, split="test", seed=0, **loaded.env_kwargs)
    obs, _ = env.reset(seed=0)
    loaded.reset(env)
    assert loaded.act(obs, env).shape[0] == 2


def test_evaluation_keeps_the_best_model_and_logs_to_tensorboard(tmp_path):
    extra = ["--eval-freq", "32", "--eval-episodes", "8", "--checkpoint-freq", "48"]
    assert _train(tmp_path, "maskable_ppo", timesteps=96, extra=extra) == 0
    records = [json.loads(line) for line in (tmp_path / "evaluations.jsonl").read_text().splitlines()]
    assert [r["timesteps"] for r in records] == [32, 64, 96]
    assert all(len(r["accuracy"]) == 5 and r["score"] == pytest.approx(sum(r["accuracy"][1:]) / 4) for r in records)
    assert (tmp_path / "best_model.zip").is_file() and (tmp_path / "model.zip").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["model_48_steps.zip", "model_96_steps.zip"]
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events and any(b"eval/score" in e.read_bytes() for e in events)


@pytest.mark.parametrize("agent", ["ppo", "recurrent_ppo", "qrdqn"])
def test_resume_continues_the_timestep_count(tmp_path, agent):
    assert _train(tmp_path, agent, timesteps=32) == 0
    first = _params(tmp_path / "model.zip")
    assert train_agent.main(["--stage", "2", "--run-dir", str(tmp_path), "--resume", "--timesteps", "96",
                             *QUIET]) == 0
    resumed = SB3Agent.load(tmp_path / "model.zip")
    assert resumed.num_timesteps == 96
    assert yaml.safe_load((tmp_path / "config.yml").read_text())["timesteps"] == 96
    assert any(not torch.equal(first[k], v) for k, v in resumed.model.policy.state_dict().items())
    assert len(list((tmp_path / "tb").iterdir())) == 1  # the same TensorBoard run goes on


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = SB3VecEnv.step_wait

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(SB3VecEnv, "step_wait", interrupted)
    assert _train(tmp_path, timesteps=128) == 130
    assert "--resume" in capsys.readouterr().out
    assert SB3Agent.load(tmp_path / "last.zip").num_timesteps == 44  # 11 vector steps of 4 slots
    monkeypatch.setattr(SB3VecEnv, "step_wait", real)
    assert train_agent.main(["--stage", "2", "--run-dir", str(tmp_path), "--resume", *QUIET]) == 0
    assert SB3Agent.load(tmp_path / "model.zip").num_timesteps >= 128


def test_same_seed_same_policy_other_seed_another(tmp_path):
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert _train(tmp_path / name, timesteps=64, extra=["--seed", seed]) == 0
    a, b, c = (_params(tmp_path / n / "model.zip") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_cli_hyperparameters_override_the_yml(tmp_path):
    assert _train(tmp_path, hyperparams=[*PPO_TINY, "gamma=0.5", "learning_rate=lin_1e-3"]) == 0
    config = yaml.safe_load((tmp_path / "config.yml").read_text())
    assert config["hyperparams"]["gamma"] == 0.5 and config["hyperparams"]["n_steps"] == 8
    assert config["hyperparams"]["ent_coef"] == 0.01  # from hyperparams/ppo.yml
    model = SB3Agent.load(tmp_path / "model.zip").model
    assert model.gamma == 0.5 and model.n_steps == 8 and model.lr_schedule(1.0) == pytest.approx(1e-3)


def test_yml_env_kwargs_and_cli_env_kwargs():
    assert resolve_config(PolicyTrainingConfig(agent="ppo"))["env_kwargs"] == {"action": "grid"}
    cfg = PolicyTrainingConfig(agent="ppo", env_kwargs={"action": "continuous", "train_size": 64}, num_envs=3)
    config = resolve_config(cfg)
    assert config["env_kwargs"] == {"action": "continuous", "train_size": 64}  # one flat way to name the task
    assert config["num_envs"] == 3 and config["timesteps"] == 100_000 and "n_envs" not in config["hyperparams"]


def test_default_run_dirs_count_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert train_agent.main(["--stage", "2", "--timesteps", "32", "--num-envs", "4", *QUIET, "--hyperparams",
                                 *PPO_TINY]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs" / "ppo").iterdir())
    assert runs == ["gfenv-GlanceFocus-v0_1", "gfenv-GlanceFocus-v0_2"]  # rl-baselines3-zoo's naming


@pytest.mark.parametrize(("argv", "message"), [
    (["--agent", "maskable_ppo", "--env-kwargs", "action=continuous"],
     "'maskable_ppo' does not support action mode 'continuous'; build the env with action='grid' "
     "(supported: grid, grid+stop)"),
    (["--env-kwargs", "dataset=glyphs", "canvas=64"],
     "python train_agent.py --stage 1 --env-kwargs dataset=glyphs canvas=64 patch_size=32 steps=5 backbone=small_cnn "
     "--run-dir runs/stage1/glyphs_canvas64\nthen pass checkpoint=runs/stage1/glyphs_canvas64/model.pt"),
    (["--agent", "random"], "fixed baseline"),
    (["--hyperparams", "learning_rat=1"], "Unknown ppo hyperparameter(s) learning_rat"),
    (["--resume"], "no config.yml"),
])
def test_user_errors_print_what_to_do_and_exit_2(tmp_path, capsys, argv, message):
    assert train_agent.main(["--stage", "2", "--run-dir", str(tmp_path / "run"), *QUIET, *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yml").exists()


def test_stage_3_cli_fine_tunes_on_the_glimpses_of_a_stage_2_run(tmp_path, capsys):
    from gfenv.checkpoint import load_model

    run = tmp_path / "run"
    assert train_agent.main(["--stage", "2", "--agent", "ppo", "--timesteps", "64", "--num-envs", "4",
                             "--hyperparams", "batch_size=64", "--run-dir", str(run), *QUIET]) == 0
    assert train_agent.main(["--stage", "3", "--run-dir", str(run), "--no-progress", "--hyperparams", "episodes=8",
                             "update_every=8", "batch_size=8"]) == 0
    model, meta = load_model(run / "stage3" / "model.pt")
    assert meta["stage"] == 3
    # the run's policy with its fine-tuned classifier, as one agent (evaluate_agent.py --agents label=<run>/stage3/...)
    agent = load_agent(run / "stage3" / "model.pt")
    assert agent.name == "ppo" and agent.env_kwargs["checkpoint"] == str(run / "stage3" / "model.pt")
    env = GlanceFocusVectorEnv(num_envs=2, split="test", seed=0, **agent.env_kwargs)
    assert all(torch.equal(a, b) for a, b in zip(env.model.state_dict().values(), model.state_dict().values()))
    out = tmp_path / "eval.json"
    assert evaluate_agent.main(["--agents", f"s3={run / 'stage3' / 'model.pt'}", "--episodes", "4",
                                "--threshold-episodes", "0", "--no-progress", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["agents"]["s3"]
    assert result["env_kwargs"]["checkpoint"] == str(run / "stage3" / "model.pt")
    with pytest.raises(FileNotFoundError, match="--stage 3 --run-dir"):
        load_agent(run / "stage3" / "other.pt")
    assert train_agent.main(["--stage", "3"]) == 2
    assert "--run-dir" in capsys.readouterr().err


def test_stage_3_cli_fine_tunes_on_the_glimpses_of_a_fixed_agent(tmp_path, capsys):
    from gfenv.checkpoint import load_model

    before = GlanceFocusVectorEnv(num_envs=1).model.classifier.state_dict()
    assert train_agent.main(["--stage", "3", "--agent", "center", "--run-dir", str(tmp_path), "--no-progress",
                             "--hyperparams", "episodes=8", "update_every=8", "batch_size=8"]) == 0
    model, meta = load_model(tmp_path / "stage3" / "model.pt")
    assert meta["stage"] == 3 and meta["agent"] == "center" and meta["updates"] == 1
    assert not all(torch.equal(a, b) for a, b in zip(before.values(), model.classifier.state_dict().values()))
    for agent, says in (("ppo", "--stage 2 --agent NAME"), ("nobody", "not a registered agent")):
        assert train_agent.main(["--stage", "3", "--agent", agent, "--run-dir", str(tmp_path / agent)]) == 2
        err = capsys.readouterr().err
        assert says in err and "center" in err
        assert not (tmp_path / agent).exists()


def test_stage_3_takes_the_tasks_registered_settings_under_the_users(tmp_path, capsys):
    from gfenv.checkpoint import load_model
    from gfenv.task import TASKS

    registered = TASKS["gfenv/GlyphChain-v0"].stage3
    assert registered["step_weights"] == "last"
    assert train_agent.main(["--stage", "3", "--agent", "center", "--env", "gfenv/GlyphChain-v0", "--run-dir",
                             str(tmp_path), "--no-progress", "--hyperparams", "episodes=8", "update_every=8",
                             "batch_size=8", "actions=sampled"]) == 0
    assert "gfenv/GlyphChain-v0's settings" in capsys.readouterr().out
    used = load_model(tmp_path / "stage3" / "model.pt")[1]["stage3"]
    assert registered["actions"] == "deterministic" and used["actions"] == "sampled"  # the user's setting wins
    assert {k: used[k] for k in registered if k != "actions"} == {k: v for k, v in registered.items() if k != "actions"}


def test_the_main_jobs_stage_3_takes_the_tasks_episodes_unless_told_otherwise():
    from gfenv.train.pipeline import PipelineConfig

    cfg, episodes = PipelineConfig(env_id="gfenv/FashionMNIST60-v0").stage3_config()
    assert cfg.lr_schedule == "cosine" and episodes == 32768
    cfg, episodes = PipelineConfig(env_id="gfenv/FashionMNIST60-v0", stage3_episodes=64,
                                   stage3={"lr_schedule": "constant"}).stage3_config()
    assert cfg.lr_schedule == "constant" and episodes == 64


def test_main_job_runs_all_stages_and_writes_its_results(tmp_path):
    import json

    # the main job's task and agent (MaskablePPO on the pointer task), on a small feature cache
    assert train_agent.main(["--timesteps", "64", "--run-dir", str(tmp_path), "--no-progress", "--env-kwargs",
                             "cache_images=64", "--hyperparams", "episodes=16", "stage3_episodes=16"]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    names = {"maskable_ppo (stage 2)", "maskable_ppo (stage 3)", "random", "center", "oracle"}
    assert set(report["agents"]) == names
    for res in report["agents"].values():
        assert len(res["accuracy"]) == len(res["macs"]) == len(res["score"]) == 4
        assert res["action"] == "grid" and res["env_kwargs"]["grid"] == 5  # the baselines too: the task's cells
    assert report["agents"]["oracle"]["score"][-1] == 100.0 and report["agents"]["random"]["score"][-1] == 0.0
    assert (tmp_path / "results.md").exists() and (tmp_path / "stage3" / "model.pt").exists()
    assert report["config"]["timesteps"] == 64 and report["config"]["env_id"] == "gfenv/GlyphPointer-v0"
    # the main job's run folder is a stage-2 run: its stage-3 model evaluates in the documented LABEL=<run>/... form
    out = tmp_path / "eval.json"
    assert evaluate_agent.main(["--agents", f"random,mppo={tmp_path}/stage3/model.pt", "--episodes", "16",
                                "--num-envs", "16", "--threshold-episodes", "0", "--no-progress",
                                "--json", str(out)]) == 0
    stage3 = json.loads(out.read_text())["agents"]["mppo"]
    assert stage3["accuracy"] == pytest.approx(report["agents"]["maskable_ppo (stage 3)"]["accuracy"])


def test_main_job_trains_for_the_budget_of_its_hyperparameter_file():
    from gfenv.train.pipeline import PipelineConfig

    cfg = PipelineConfig()
    resolved = resolve_config(PolicyTrainingConfig(agent=cfg.agent, env_id=cfg.env_id, timesteps=cfg.timesteps))
    yml = yaml.safe_load((HYPERPARAMS_DIR / "maskable_ppo.yml").read_text())
    assert resolved["timesteps"] == yml["gfenv/GlyphPointer-v0"]["n_timesteps"] == 300_000
    assert resolved["env_kwargs"]["cache"] == "memory"


def test_evaluate_agent_loads_a_trained_run_by_label(tmp_path):
    run = tmp_path / "run"
    assert train_agent.main(["--stage", "2", "--agent", "ppo", "--timesteps", "64", "--num-envs", "4",
                             "--hyperparams", "batch_size=64", "--run-dir", str(run), *QUIET]) == 0
    out = tmp_path / "eval.json"
    assert evaluate_agent.main(["--agents", f"random,mine={run}", "--episodes", "8", "--num-envs", "8",
                                "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())["agents"]
    assert set(report) == {"random", "mine"} and report["mine"]["policy_macs_per_step"] > 0
    assert report["mine"]["macs"][-1] > report["random"]["macs"][-1]
