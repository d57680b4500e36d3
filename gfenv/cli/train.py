"""Train GFNet's stages on a gfenv task.

Stage 1 (warm-up): encoders and classifier on uniformly random focus patches, e.g.
    python train_agent.py --stage 1 --env-kwargs dataset=glyphs --run-dir runs/stage1/glyphs
The checkpoint it writes (``<run-dir>/model.pt``) is what the environment loads (``checkpoint=...``).
Stages 1 and 3 also run data-parallel on N processes (NCCL on GPUs, Gloo on CPUs; --batch-size stays the global
batch, rank 0 prints and writes), e.g.
    torchrun --standalone --nproc_per_node=2 train_agent.py --stage 1 --device cuda --run-dir runs/stage1/glyphs

Stage 2 (policy learning): a learned agent on the frozen stage-1 features, e.g.
    python train_agent.py --stage 2 --agent maskable_ppo --timesteps 200000
writes runs/<agent>/GlanceFocus-v0_<n>/ (config.yml, tb/, evaluations.jsonl, best_model, model, last, checkpoints/);
hyperparameters from hyperparams/<agent>.yml, overridable with --hyperparams k=v.

Stage 3 (fine-tuning on a policy's glimpses): the classifier (and by option the encoders) on the patches an agent
picks, with its actions sampled, e.g.
    python train_agent.py --stage 3 --run-dir runs/maskable_ppo/GlanceFocus-v0_1 --hyperparams episodes=8192
    python train_agent.py --stage 3 --agent center            # a fixed agent: runs/center/stage3/model.pt

Static reference: the same encoder family on the whole image at full resolution (the accuracy GFNet must match), e.g.
    python train_agent.py --stage static --env-kwargs dataset=glyphs --run-dir runs/static/glyphs
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import gymnasium

from agents.learned import learned_agent_names
from gfenv import ENV_ID
from gfenv.train.common import low_memory
from gfenv.train.stage1 import Stage1Config, train_stage1
from gfenv.train.stage2 import PolicyTrainingConfig, choose_run_dir, train_policy
from gfenv.utils import keep_freed_memory, parse_kv

ENV_TO_STAGE1 = {"patch_size", "steps", "backbone", "classifier", "hidden", "glance_mode"}


def stage1_config(args: argparse.Namespace) -> Stage1Config:
    """Stage-1 settings from the CLI: env kwargs name the task, --hyperparams override the training fields."""
    cfg = Stage1Config(seed=args.seed, device=args.device)
    env_kwargs = parse_kv(args.env_kwargs)
    cfg.dataset = env_kwargs.pop("dataset", cfg.dataset)
    if "data_root" in env_kwargs:
        env_kwargs["root"] = env_kwargs.pop("data_root")
    env_kwargs.update(env_kwargs.pop("dataset_kwargs", None) or {})
    for key in ENV_TO_STAGE1 & set(env_kwargs):
        setattr(cfg, key, env_kwargs.pop(key))
    for key in ("checkpoint", "action", "observation", "reward", "split", "device", "seed", "grid"):
        env_kwargs.pop(key, None)
    cfg.dataset_kwargs = env_kwargs
    fields = {f.name: f for f in dataclasses.fields(Stage1Config)}
    for key, value in parse_kv(args.hyperparams).items():
        if key not in fields:
            raise SystemExit(f"Unknown stage-1 hyperparameter {key!r}. Valid: {', '.join(sorted(fields))}.")
        setattr(cfg, key, value)
    for key in ("epochs", "batch_size", "optimizer", "amp", "accum_steps"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.grad_checkpointing:
        cfg.grad_checkpointing = True
    if args.low_memory:
        for key, value in low_memory(dataclasses.asdict(cfg)).items():
            setattr(cfg, key, value)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", choices=["1", "2", "3", "all", "static"],
                   help="1: encoders + classifier (warm-up); 2: the policy (an agent); 3: fine-tuning; "
                        "static: the full-resolution reference network")
    p.add_argument("--env", default=ENV_ID, help="environment id (names the default task)")
    p.add_argument("--env-kwargs", nargs="*", action="extend", default=[], metavar="K=V",
                   help="task: dataset=glyphs|mnist|cifar10|..., data_root=PATH, patch_size=, steps=, backbone=, ...; "
                        "stage 2 also action=, observation=, reward=, checkpoint=PATH")
    p.add_argument("--hyperparams", nargs="*", action="extend", default=[], metavar="K=V",
                   help="stage 1: Stage1Config fields; stage 2: the agent's (over hyperparams/<agent>.yml); "
                        "static: StaticConfig fields")
    p.add_argument("--agent", default=None, help="stage 2: learned agent to train (default ppo); stage 3 without "
                                                 "--run-dir: a fixed agent (random, center, raster, oracle)")
    p.add_argument("--timesteps", type=int, default=None, help="stage 2: total timesteps (default: the yml's)")
    p.add_argument("--num-envs", type=int, default=None, help="stage 2: parallel env slots (default: the yml's)")
    p.add_argument("--eval-freq", type=int, default=10_000,
                   help="stage 2: evaluate on the test split every N timesteps (0: at the end only, -1: never)")
    p.add_argument("--eval-episodes", type=int, default=500, help="stage 2: test images per evaluation")
    p.add_argument("--checkpoint-freq", type=int, default=50_000, help="stage 2: checkpoint every N timesteps")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--accum-steps", type=int, default=None, help="micro-batches per optimiser step (less memory)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None)
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default=None)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--low-memory", action="store_true",
                   help="smallest memory footprint: bf16 autocast + activation checkpointing + 4 micro-batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--run-dir", default=None,
                   help="output folder (default stage 1: runs/stage1/<dataset>; stage 2: runs/<agent>/<env>_<n>; "
                        "static: runs/static/<dataset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <run-dir>/last.* (stage 2 without --run-dir: the agent's latest run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def stage2(args: argparse.Namespace) -> int:
    """Stage 2 through ``gfenv.train.stage2.train_policy``; user errors print and return 2, Ctrl-C returns 130."""
    cfg = PolicyTrainingConfig(agent=args.agent, env_id=args.env, env_kwargs=parse_kv(args.env_kwargs),
                               hyperparams=parse_kv(args.hyperparams), timesteps=args.timesteps,
                               num_envs=args.num_envs, seed=args.seed, device=args.device, eval_freq=args.eval_freq,
                               eval_episodes=args.eval_episodes, checkpoint_freq=args.checkpoint_freq,
                               progress=not args.no_progress)
    try:
        run_dir = choose_run_dir(cfg, args.run_dir, args.resume)
        train_policy(cfg, run_dir, resume=args.resume)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main_job(args: argparse.Namespace) -> int:
    """``--stage all`` (the default): stage 2 with ``--agent`` (ppo), stage 3, evaluation against the baselines."""
    from gfenv.train.pipeline import PipelineConfig, run_pipeline
    from gfenv.train.stage2 import next_run_dir

    cfg = PipelineConfig(agent=args.agent or "ppo", env_kwargs=parse_kv(args.env_kwargs), seed=args.seed,
                         device=args.device, progress=not args.no_progress)
    if args.timesteps is not None:
        cfg.timesteps = args.timesteps
    for key, value in parse_kv(args.hyperparams).items():
        if not hasattr(cfg, key):
            print(f"error: unknown main-job setting {key!r}; valid: {', '.join(cfg.__dataclass_fields__)}.",
                  file=sys.stderr)
            return 2
        setattr(cfg, key, value)
    run_dir = Path(args.run_dir) if args.run_dir else next_run_dir("main", args.env)
    try:
        run_pipeline(cfg, run_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"everything is in {run_dir}")
    return 0


def stage3(args: argparse.Namespace) -> int:
    """``--stage 3 --run-dir RUN``: fine-tune the classifier on the glimpses of RUN's stage-2 agent; ``--stage 3
    --agent NAME`` (a fixed agent of the registry: random, center, raster, oracle): on that agent's glimpses, saved
    to ``<run-dir or runs/NAME>/stage3/model.pt``."""
    from agents import AGENTS, make_agent
    from agents.learned import is_learned, learned_agent_names, load_agent
    from gfenv.train.distributed import distributed, is_main
    from gfenv.train.stage3 import Stage3Config, finetune

    fixed = sorted(n for n in AGENTS if not is_learned(n))
    if args.agent is not None and (args.agent not in AGENTS or is_learned(args.agent)):
        what = "is trained in stage 2" if args.agent in AGENTS else "is not a registered agent"
        print(f"error: --stage 3 --agent takes a fixed agent ({', '.join(fixed)}); {args.agent!r} {what}. For a "
              f"learned agent ({', '.join(learned_agent_names())}) train it with --stage 2 --agent NAME, then run "
              "--stage 3 --run-dir RUN on its run folder.", file=sys.stderr)
        return 2
    if not args.run_dir and args.agent is None:
        print("error: --stage 3 needs --run-dir of a stage-2 run (its agent picks the patches), or --agent with a "
              f"fixed agent ({', '.join(fixed)}).", file=sys.stderr)
        return 2
    fields = set(Stage3Config.__dataclass_fields__)
    settings = parse_kv(args.hyperparams)
    episodes = int(settings.pop("episodes", 8192))
    for key in ("amp", "accum_steps"):  # the memory flags mean the same as in stage 1
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.grad_checkpointing:
        settings["grad_checkpointing"] = True
    if args.low_memory:
        low_memory(settings)
    unknown = sorted(set(settings) - fields)
    if unknown:
        print(f"error: unknown stage-3 settings {unknown}; valid: episodes, {', '.join(sorted(fields))}.",
              file=sys.stderr)
        return 2
    try:
        with distributed(args.device) as device:  # under torchrun: this process's group and device
            if args.agent is not None:
                agent, out = make_agent(args.agent, seed=args.seed), Path(args.run_dir or f"runs/{args.agent}")
            else:
                agent, out = load_agent(args.run_dir, device=str(device)), Path(args.run_dir)
            path = finetune(agent, parse_kv(args.env_kwargs), episodes, Stage3Config(seed=args.seed, **settings),
                            seed=args.seed, device=device, progress=not args.no_progress,
                            path=out / "stage3" / "model.pt")
            main_process = is_main()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if main_process:
        print(f"stage 3 checkpoint: {path} (evaluate with --env-kwargs checkpoint={path})")
    return 0


def static_stage(args: argparse.Namespace) -> int:
    """``--stage static``: train the static full-resolution reference (``gfenv.train.static``), print its test accuracy."""
    from gfenv.train.static import static_config, train_static

    try:
        cfg = static_config(parse_kv(args.env_kwargs), parse_kv(args.hyperparams), seed=args.seed,
                            device=args.device, epochs=args.epochs, batch_size=args.batch_size,
                            optimizer=args.optimizer, amp=args.amp)
        train_static(cfg, Path(args.run_dir or f"runs/static/{cfg.dataset}"), resume=args.resume,
                     progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # no page faults on the env's big per-step tensors (gfenv.utils)
    if args.env not in gymnasium.registry:
        parser.error(f"Unknown env id {args.env!r}. Registered gfenv ids: "
                     f"{', '.join(sorted(e for e in gymnasium.registry if e.startswith('gfenv/')))}.")
    if args.stage == "all":
        return main_job(args)
    if args.stage == "3":
        return stage3(args)
    if args.stage == "static":
        return static_stage(args)
    if args.agent is not None and args.stage != "2":
        parser.error(f"--agent trains a policy in stage 2; add --stage 2 (learned agents: "
                     f"{', '.join(learned_agent_names())}).")
    if args.stage == "2":
        return stage2(args)
    cfg = stage1_config(args)
    run_dir = Path(args.run_dir or f"runs/stage1/{cfg.dataset}")
    try:
        train_stage1(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
