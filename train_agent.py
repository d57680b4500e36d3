"""Train GFNet's stages on a gfenv task.

Stage 1 (warm-up): encoders and classifier on uniformly random focus patches, e.g.
    python train_agent.py --stage 1 --env-kwargs dataset=glyphs --run-dir runs/stage1/glyphs
The checkpoint it writes (``<run-dir>/model.pt``) is what the environment loads (``checkpoint=...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from gfenv.training import Stage1Config, train_stage1
from gfenv.utils import parse_kv

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
        cfg = Stage1Config.low_memory(cfg)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="1", choices=["1"],
                   help="GFNet stage to run (stages 2 and 3: see the agents issue)")
    p.add_argument("--env", default="gfenv/GlanceFocus-v0", help="environment id (names the default task)")
    p.add_argument("--env-kwargs", nargs="*", action="extend", default=[], metavar="K=V",
                   help="task: dataset=glyphs|mnist|cifar10|..., data_root=PATH, patch_size=, steps=, backbone=, ...")
    p.add_argument("--hyperparams", nargs="*", action="extend", default=[], metavar="K=V",
                   help="Stage1Config fields to override")
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
    p.add_argument("--run-dir", default=None, help="output folder (default runs/stage1/<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = stage1_config(args)
    run_dir = Path(args.run_dir or f"runs/stage1/{cfg.dataset}")
    try:
        train_stage1(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
