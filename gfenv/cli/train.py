"""Train GFNet's stages on a gfenv task (``python train_agent.py`` or ``gfenv-train``).

The main job (no --stage): stage 2 (MaskablePPO), stage 3 and the evaluation against the baselines on
gfenv/GlyphPointer-v0 (one pointer hop: read the key, then look where it points), with its shipped stage-1 encoders,
    python train_agent.py                                  # writes runs/main/<env>_<n>/

A task is named the same way in every stage: --env ID (a registered task: its words are the defaults) and
--env-kwargs in the env's own words (dataset=, data_root=, canvas=, fragments=, patch_size=, steps=, backbone=,
checkpoint=, ...). A stage-1 checkpoint records its task, so later stages need only checkpoint=PATH.

Stage 1 (warm-up): encoders and classifier on uniformly random focus patches, e.g.
    python train_agent.py --stage 1 --env gfenv/FashionMNIST60-v0 --env-kwargs data_root=DATA
writes <run-dir>/model.pt (default runs/stage1/<task>), which the env loads with checkpoint=PATH. Stages 1 and 3 also
run data-parallel under torchrun (NCCL on GPUs, Gloo on CPUs; --batch-size stays the global batch, rank 0 writes).

Stage 2 (the policy): a learned agent on the frozen stage-1 features, e.g.
    python train_agent.py --stage 2 --agent maskable_ppo --env-kwargs checkpoint=runs/stage1/FashionMNIST60-v0/model.pt
writes runs/<agent>/<env>_<n>/ (config.yml, tb/, evaluations.jsonl, best_model, model, last, checkpoints/);
hyperparameters from gfenv/train/hyperparams/<agent>.yml (the env id's block over the default block, or the default
block alone, as config.yml records), overridable with --hyperparams k=v. Its periodic evaluation and best_model use
the validation split (carved from train); the test split is left to evaluate_agent.py.

Stage 3 (fine-tuning on a policy's glimpses): the classifier and the focus encoder, as the main job does, on the
patches an agent picks with its actions sampled (GFNet's frozen mode), e.g.
    python train_agent.py --stage 3 --run-dir runs/maskable_ppo/gfenv-GlanceFocus-v0_1   # writes <run>/stage3/model.pt
    python train_agent.py --stage 3 --agent center     # a fixed agent: runs/center/...
--hyperparams take Stage3Config fields (train_focus=false for the classifier alone, episodes=N, ...).

Static reference: the same encoder family on the whole image at full resolution (the accuracy GFNet must match), e.g.
    python train_agent.py --stage static --run-dir runs/static/glyphs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
from pathlib import Path
from typing import Any

import gymnasium

from gfenv import ENV_ID
from gfenv.cli import add_common_flags, run_command
from gfenv.task import canonical_words, recorded_task, registered_words, resolve_task, stage_settings, task_words
from gfenv.utils import argument, check_device, check_int, import_modules, keep_freed_memory, parse_kv

TRUST_HELP = ("--resume and --stage 3 --run-dir: load an SB3 zip with SB3's own loader, which unpickles it and so RUNS "
              "ANY CODE a crafted file carries; only for files you trust (a zip written elsewhere, or one gfenv cannot "
              "rebuild from its plain-text settings). Without it agents load from their weights (weights_only) and "
              "plain-text settings, and nothing is unpickled")


def task_of(args: argparse.Namespace, default: str = ENV_ID) -> tuple[str, dict[str, Any]]:
    """The env id and env words of the command line: ``--env``'s registered words, then ``--env-kwargs``. Without
    ``--env``, a checkpoint that records the env id it was trained for names it; else words that name a dataset
    are read over the default task's (no words), and no words at all name ``default``."""
    user = canonical_words(parse_kv(args.env_kwargs, "--env-kwargs"))
    env_id = args.env
    if env_id is None and user.get("checkpoint") not in (None, "default"):
        recorded = recorded_task(user["checkpoint"])[0]
        env_id = recorded if recorded in gymnasium.registry else None
    env_id = env_id or (ENV_ID if "dataset" in user or "checkpoint" in user else default)
    if env_id not in gymnasium.registry:
        known = sorted(e for e in gymnasium.registry if e.startswith("gfenv/"))
        raise ValueError(f"--env {env_id}: no such env id. Registered gfenv ids: {', '.join(known)}.")
    return env_id, {**registered_words(env_id), **user}


def stage1_config(args: argparse.Namespace):
    """Stage-1 settings from the command line: the task's words, then --hyperparams (``Stage1Config`` fields), then
    the training flags."""
    from gfenv.train.common import low_memory
    from gfenv.train.stage1 import Stage1Config

    env_id, words = task_of(args)
    words.pop("checkpoint", None)  # stage 1 writes the checkpoint
    spec = resolve_task(task_words(words), need_checkpoint=False)
    cfg = Stage1Config(seed=args.seed, device=args.device, dataset=spec.dataset, dataset_kwargs=spec.source_kwargs,
                       env_id=spec.env_id or env_id, **spec.model_words)
    fields = {f.name for f in dataclasses.fields(Stage1Config)}
    settings = stage_settings(spec.env_id or env_id, "stage1", parse_kv(args.hyperparams, "--hyperparams"),
                              announce=True)
    for key, value in settings.items():
        if key not in fields:
            raise ValueError(f"Unknown stage-1 hyperparameter {key!r}. Valid: {', '.join(sorted(fields))}.")
        setattr(cfg, key, value)
    for key in ("epochs", "batch_size", "optimizer", "amp", "accum_steps"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.grad_checkpointing:
        cfg.grad_checkpointing = True
    if args.low_memory:
        for key, value in low_memory(dataclasses.asdict(cfg)).items():
            setattr(cfg, key, value)
    return dataclasses.replace(cfg), spec  # every setting checked (Stage1Config.__post_init__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_agent.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", choices=["1", "2", "3", "all", "static"],
                   help="1: encoders + classifier (warm-up); 2: the policy (an agent); 3: fine-tuning on the "
                        "policy's glimpses; all (default): the main job, stages 2 and 3 and the evaluation; static: "
                        "the full-resolution reference network")
    p.add_argument("--env", default=None,
                   help=f"registered env id naming the task (default: the one the checkpoint records, else {ENV_ID})")
    p.add_argument("--env-kwargs", nargs="*", action="extend", default=[], metavar="K=V",
                   help="the task in the env's words: dataset=, data_root=, canvas=, fragments=, patch_size=, steps=, "
                        "backbone=, checkpoint=PATH, ...; stage 2 also action=, observation=, reward=")
    p.add_argument("--hyperparams", nargs="*", action="extend", default=[], metavar="K=V",
                   help="stage 1: Stage1Config fields; stage 2: the agent's (over its yml); stage 3: Stage3Config "
                        "fields and episodes=N; static: StaticConfig fields; main job: PipelineConfig fields")
    p.add_argument("--agent", default=None,
                   help="stage 2 and the main job: learned agent to train (default: ppo in stage 2, maskable_ppo in "
                        "the main job); stage 3 without --run-dir: a fixed agent (random, center, raster, oracle)")
    p.add_argument("--timesteps", type=argument("int", low=1), default=None,
                   help="stage 2 and the main job: total timesteps, at least 1 (default: the yml's)")
    p.add_argument("--num-envs", type=argument("int", low=1), default=None,
                   help="stage 2: parallel env slots, at least 1 (default: the yml's)")
    p.add_argument("--eval-freq", type=argument("int", low=-1), default=10_000,
                   help="stage 2: evaluate on the validation split every N timesteps (0: at the end only, -1: never)")
    p.add_argument("--eval-episodes", type=argument("int", low=1), default=500,
                   help="stage 2: validation images per evaluation")
    p.add_argument("--checkpoint-freq", type=argument("int", low=0), default=50_000,
                   help="stage 2: checkpoint every N timesteps (0: at the end only)")
    p.add_argument("--epochs", type=argument("float", above=0), default=None,
                   help="stages 1 and static: passes over the train split")
    p.add_argument("--batch-size", type=argument("int", low=1), default=None,
                   help="stages 1 and static: images per optimiser step")
    p.add_argument("--accum-steps", type=argument("int", low=1), default=None,
                   help="micro-batches per optimiser step (less memory)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None)
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default=None)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--low-memory", action="store_true",
                   help="smallest memory footprint: bf16 autocast + activation checkpointing + 4 micro-batches")
    p.add_argument("--seed", type=argument("int", low=0), default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--run-dir", default=None,
                   help="output folder (default stage 1: runs/stage1/<task>; stage 2: runs/<agent>/<env>_<n>; main "
                        "job: runs/main/<env>_<n>; static: runs/static/<dataset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <run-dir>/last.* (stage 2 without --run-dir: the agent's latest run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (stage 1 still prints each epoch)")
    p.add_argument("--trust-pickled-zip", action="store_true", help=TRUST_HELP)
    add_common_flags(p)
    return p


def stage1(args: argparse.Namespace) -> int:
    from gfenv.train.stage1 import train_stage1

    cfg, spec = stage1_config(args)
    run_dir = Path(args.run_dir or spec.stage1_run_dir())
    train_stage1(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    return 0


def stage2(args: argparse.Namespace) -> int:
    """Stage 2 through ``gfenv.train.stage2.train_policy``."""
    from gfenv.train.runs import choose_run_dir
    from gfenv.train.stage2 import PolicyTrainingConfig, train_policy

    env_id, words = task_of(args)
    cfg = PolicyTrainingConfig(agent=args.agent, env_id=env_id,
                               env_kwargs=parse_kv(args.env_kwargs, "--env-kwargs"),
                               hyperparams=parse_kv(args.hyperparams, "--hyperparams"), timesteps=args.timesteps,
                               num_envs=args.num_envs, seed=args.seed, device=args.device, eval_freq=args.eval_freq,
                               eval_episodes=args.eval_episodes, checkpoint_freq=args.checkpoint_freq,
                               progress=not args.no_progress, trust_pickled_zip=args.trust_pickled_zip)
    run_dir = choose_run_dir(cfg.agent, env_id, args.run_dir, args.resume)
    train_policy(cfg, run_dir, resume=args.resume)
    return 0


def main_job(args: argparse.Namespace) -> int:
    """``--stage all`` (the default): stage 2 with ``--agent`` (maskable_ppo), stage 3, evaluation against the
    baselines, on ``--env`` (gfenv/GlyphPointer-v0)."""
    from gfenv.train.pipeline import MAIN_AGENT, MAIN_ENV, PipelineConfig, run_pipeline
    from gfenv.train.runs import next_run_dir

    env_id, _ = task_of(args, default=MAIN_ENV)
    cfg = PipelineConfig(agent=args.agent or MAIN_AGENT, env_id=env_id,
                         env_kwargs=parse_kv(args.env_kwargs, "--env-kwargs"), seed=args.seed, device=args.device,
                         progress=not args.no_progress)
    if args.timesteps is not None:
        cfg.timesteps = args.timesteps
    for key, value in parse_kv(args.hyperparams, "--hyperparams").items():
        if not hasattr(cfg, key):
            raise ValueError(f"unknown main-job setting {key!r}; valid: {', '.join(cfg.__dataclass_fields__)}.")
        setattr(cfg, key, value)
    cfg = dataclasses.replace(cfg)  # every setting checked (PipelineConfig.__post_init__)
    run_dir = Path(args.run_dir) if args.run_dir else next_run_dir("main", env_id)
    run_pipeline(cfg, run_dir)
    print(f"everything is in {run_dir}")
    return 0


def stage3(args: argparse.Namespace) -> int:
    """``--stage 3 --run-dir RUN``: fine-tune on the glimpses of RUN's stage-2 agent; ``--stage 3 --agent NAME`` (a
    fixed agent of the registry: random, center, raster, oracle): on that agent's glimpses, saved to
    ``<run-dir or runs/NAME>/stage3/model.pt``."""
    from agents import AGENTS, make_agent
    from agents.learned import is_learned, learned_agent_names
    from gfenv.train.common import low_memory
    from gfenv.train.distributed import distributed, is_main
    from gfenv.train.runs import claim_run_dir, load_agent, read_config, stage3_checkpoint
    from gfenv.train.stage3 import STAGE3_EPISODES, Stage3Config, finetune

    fixed = sorted(n for n in AGENTS if not is_learned(n))
    if args.agent is not None and (args.agent not in AGENTS or is_learned(args.agent)):
        what = "is trained in stage 2" if args.agent in AGENTS else "is not a registered agent"
        raise ValueError(f"--stage 3 --agent takes a fixed agent ({', '.join(fixed)}); {args.agent!r} {what}. For a "
                         f"learned agent ({', '.join(learned_agent_names())}) train it with --stage 2 --agent NAME, "
                         "then run --stage 3 --run-dir RUN on its run folder.")
    if not args.run_dir and args.agent is None:
        raise ValueError("--stage 3 needs --run-dir of a stage-2 run (its agent picks the patches), or --agent with a "
                         f"fixed agent ({', '.join(fixed)}).")
    env_kwargs = parse_kv(args.env_kwargs, "--env-kwargs")
    if args.agent is not None:
        env_id, env_kwargs = task_of(args)
    else:
        env_id = read_config(args.run_dir).get("env")
    settings = stage_settings(env_id, "stage3", parse_kv(args.hyperparams, "--hyperparams"), announce=True)
    episodes = check_int("episodes", settings.pop("episodes", STAGE3_EPISODES), 1, hint="train images")
    for key in ("amp", "accum_steps"):  # the memory flags mean the same as in stage 1
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.grad_checkpointing:
        settings["grad_checkpointing"] = True
    if args.low_memory:
        low_memory(settings)
    fields = set(Stage3Config.__dataclass_fields__)
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(f"unknown stage-3 settings {unknown}; valid: episodes, {', '.join(sorted(fields))}.")
    stage3_cfg = Stage3Config(seed=args.seed, **settings)
    out = Path(args.run_dir or f"runs/{args.agent}")
    with distributed(args.device) as device:  # under torchrun: this process's group and device
        # the process that writes claims the folder first (a stage-2 run still training in RUN is refused)
        with claim_run_dir(out) if is_main() else contextlib.nullcontext():
            if args.agent is not None:
                agent = make_agent(args.agent, seed=args.seed)
            else:
                agent = load_agent(args.run_dir, device=str(device), trust_pickled_zip=args.trust_pickled_zip)
            path = finetune(agent, env_kwargs, episodes, stage3_cfg, seed=args.seed, device=device,
                            progress=not args.no_progress, path=stage3_checkpoint(out))
        main_process = is_main()
    if main_process:
        print(f"stage 3 checkpoint: {path} (evaluate with evaluate_agent.py --agents LABEL={path})")
    return 0


def static_stage(args: argparse.Namespace) -> int:
    """``--stage static``: train the static full-resolution reference, print its test accuracy."""
    from gfenv.train.static import static_config, train_static

    _, words = task_of(args)
    cfg = static_config(words, parse_kv(args.hyperparams, "--hyperparams"), seed=args.seed, device=args.device,
                        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, amp=args.amp)
    train_static(cfg, Path(args.run_dir or f"runs/static/{cfg.dataset}"), resume=args.resume,
                 progress=not args.no_progress)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


STAGES = {"1": stage1, "2": stage2, "3": stage3, "all": main_job, "static": static_stage}


def main(argv: list[str] | None = None) -> int:
    """Run the stage; a user error prints one line and returns 2 (``--debug``: the traceback), Ctrl-C or SIGTERM
    returns 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # no page faults on the env's big per-step tensors (gfenv.utils)
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM saves and exits like Ctrl-C (torchrun: GracefulStop)
    if args.agent is not None and args.stage in ("1", "static"):
        parser.error(f"--agent names the policy of stages 2 and 3 and the main job, not of --stage {args.stage}.")
    return run_command(_run_stage, args)


def _run_stage(args: argparse.Namespace) -> int:
    import_modules(args.imports)
    check_device(args.device, "--device")  # before anything is built or written
    return STAGES[args.stage](args)
