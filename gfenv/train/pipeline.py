"""The main job: GFNet's pipeline on one task — stage 2 (a learned policy on the frozen stage-1 features), stage 3
(the classifier fine-tuned on the policy's own glimpses) and an evaluation against the baselines on the test split.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agents.base import make_agent
from gfenv.eval.evaluation import evaluate, format_table, oracle_normalised
from gfenv.task import registered_words, stage_settings
from gfenv.train.runs import claim_run_dir, read_config, stage3_checkpoint
from gfenv.train.stage2 import PolicyTrainingConfig, train_policy
from gfenv.train.stage3 import STAGE3_EPISODES, Stage3Config, finetune
from gfenv.utils import check_device, check_fields

BASELINES = ("random", "center", "oracle")
MAIN_AGENT = "maskable_ppo"
MAIN_ENV = "gfenv/GlyphPointer-v0"
"""The main job's task: one pointer hop, where reading the key tells where the target is (so a learned policy beats
random and fixed looking by far), and where stage 3 pays (stage 1's random patches rarely show key and target
together)."""


@dataclass
class PipelineConfig:
    """The main job's settings; the defaults finish in under 10 minutes on a 2-core CPU."""

    agent: str = MAIN_AGENT
    """Learned agent for stage 2 (its hyperparameters come from ``gfenv/train/hyperparams/<agent>.yml``)."""
    env_id: str = MAIN_ENV
    """The registered task (its words are the env's defaults; it picks the hyperparameter block)."""
    env_kwargs: dict = field(default_factory=dict)
    """Env words over the task's (its shipped stage-1 encoders by default)."""
    timesteps: int | None = None
    """Stage-2 training timesteps; default the agent's ``n_timesteps`` in ``hyperparams/<agent>.yml`` (MaskablePPO
    on gfenv/GlyphPointer-v0: 300,000)."""
    stage3_episodes: int | None = None
    """Train images the stage-3 fine-tuning runs the policy on; default the task's ``episodes`` (``Task.stage3``),
    else ``STAGE3_EPISODES`` (8,192)."""
    stage3: dict = field(default_factory=dict)
    """``Stage3Config`` fields over the task's (``gfenv.task.Task.stage3``) and the defaults (GFNet's: the classifier
    and the focus encoder, classifier lr 0.01)."""
    episodes: int = 2000
    """Test images of the final evaluation (the first ones of the split, the same for every agent)."""
    seed: int = 0
    """Seeds every stage."""
    device: str = "cpu"
    """Torch device."""
    progress: bool = True
    """Progress bars."""

    def __post_init__(self) -> None:
        check_fields(self, "main-job setting", {"timesteps": {"low": 1, "hint": "None: the yml's n_timesteps"},
                                                "stage3_episodes": {"low": 1, "hint": "None: the task's or 8192"},
                                                "episodes": {"low": 1},
                                                "seed": {"low": 0}})
        # a bad stage-3 setting fails now, not after stage 2 trains
        self.stage3_config()

    def stage3_config(self) -> tuple[Stage3Config, int]:
        """Stage 3's settings and episodes: the task's registered ones (``Task.stage3``), then ``stage3`` and
        ``stage3_episodes``."""
        settings = stage_settings(self.env_id, "stage3", self.stage3)
        episodes = settings.pop("episodes", STAGE3_EPISODES)
        return Stage3Config(seed=self.seed, **settings), self.stage3_episodes or episodes


def run_pipeline(cfg: PipelineConfig, run_dir: str | Path) -> dict[str, Any]:
    """Stages 2 and 3 and the evaluation; everything lands in ``run_dir`` (``results.json``, ``results.md``)."""
    check_device(cfg.device)
    with claim_run_dir(run_dir):
        return _run_pipeline(cfg, Path(run_dir))


def _run_pipeline(cfg: PipelineConfig, run_dir: Path) -> dict[str, Any]:
    t0 = time.time()
    policy = train_policy(PolicyTrainingConfig(agent=cfg.agent, env_id=cfg.env_id, env_kwargs=dict(cfg.env_kwargs),
                                               timesteps=cfg.timesteps, seed=cfg.seed, device=cfg.device,
                                               eval_freq=-1, checkpoint_freq=0, progress=cfg.progress), run_dir)
    config = read_config(run_dir)  # what stage 2 resolved: the task's words, the budget (the yml's by default)
    env_kwargs, timesteps = {k: v for k, v in config["env_kwargs"].items()}, config["timesteps"]
    t2 = time.time()
    stage3_cfg, stage3_episodes = cfg.stage3_config()
    stage3_path = finetune(policy, env_kwargs, stage3_episodes, stage3_cfg,
                           seed=cfg.seed, device=cfg.device, progress=cfg.progress, path=stage3_checkpoint(run_dir))
    t3 = time.time()
    baselines = {name: make_agent(name, seed=cfg.seed) for name in BASELINES}
    # the agents bring their own action mode and observation; the task's registered ones are the baselines'
    registered = registered_words(cfg.env_id)
    task = {k: v for k, v in env_kwargs.items() if k not in ("action", "observation")}
    task.update({k: registered[k] for k in ("action", "grid") if k in registered})
    stage2 = evaluate({f"{cfg.agent} (stage 2)": policy, **baselines}, task, cfg.episodes, cfg.seed,
                      device=cfg.device, progress=cfg.progress)
    stage3 = evaluate({f"{cfg.agent} (stage 3)": policy}, {**task, "checkpoint": str(stage3_path)},
                      cfg.episodes, cfg.seed, device=cfg.device, progress=cfg.progress)
    results = {**stage2, **stage3}
    score = oracle_normalised(results)
    for name in results:
        results[name]["score"] = score[name]
    seconds = {"stage2": round(t2 - t0, 1), "stage3": round(t3 - t2, 1), "evaluation": round(time.time() - t3, 1)}
    table = format_table(results)
    lines = [table, "", "oracle-normalised score at the last step, (agent - random) / (oracle - random):"]
    lines += [f"  {name:<22} {score[name][-1]:6.1f} %" for name in results if name not in ("random", "oracle")]
    lines += ["", "seconds: " + ", ".join(f"{k} {v}" for k, v in seconds.items())]
    report = "\n".join(lines)
    print(report)
    (run_dir / "results.md").write_text("```\n" + report + "\n```\n")
    summary = {"config": {**asdict(cfg), "timesteps": timesteps}, "seconds": seconds,
               "stage3_checkpoint": str(stage3_path), "agents": results}
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results
