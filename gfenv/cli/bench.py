"""``python -m gfenv.bench`` (also ``gfenv-bench``): how fast the env steps, side by side in one run; see
``gfenv.bench``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch  # noqa: F401  (tests look up torch.cuda here)

from gfenv.bench import KEYS, format_report, run
from gfenv.bench import __doc__ as BENCH_DOC
from gfenv.cli import add_common_flags, run_command
from gfenv.utils import argument, check_device, check_output, keep_freed_memory


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gfenv.bench", description=BENCH_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--num-envs", type=argument("int", low=1), default=256,
                   help="slots of the batched env (and single envs of per_env)")
    p.add_argument("--repeats", type=argument("int", low=1), default=15,
                   help="timed runs per measure and cycle (medians are reported)")
    p.add_argument("--episodes", type=argument("int", low=1), default=1,
                   help="episodes per timed run of batched and floor")
    p.add_argument("--cycles", type=argument("int", low=1), default=3,
                   help="rounds of all measures (per_env and sb3_ppo in every cycle, beside a batched run)")
    p.add_argument("--threads", type=argument("int", low=1), default=None,
                   help="torch intra-op threads (default: torch's)")
    p.add_argument("--cache-images", type=argument("int", low=1), default=1024,
                   help="images in the cached mode's feature cache")
    p.add_argument("--imports", type=argument("int", low=0), default=5,
                   help="rounds of import timings (gfenv against torch; 0: none)")
    p.add_argument("--single-episodes", type=argument("int", low=1), default=32,
                   help="episodes per timed run of the single env")
    p.add_argument("--skip", default="", help=f"comma-separated measures to leave out ({', '.join(KEYS)})")
    p.add_argument("--memory", action="store_true", help="CUDA: peak memory of GFNet's ImageNet stage-1 settings")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's table of the batched steps")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    add_common_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    keep_freed_memory()  # as the project's scripts do (gfenv.utils): no page faults on big per-step tensors
    skip = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    unknown = sorted(set(skip) - set(KEYS))
    if unknown:
        p.error(f"Unknown measure(s) {unknown} in --skip; valid: {', '.join(KEYS)}.")
    try:
        check_device(args.device, "--device")
    except ValueError as err:
        p.error(str(err))
    return run_command(lambda a: _bench(a, skip), args)


def _bench(args: argparse.Namespace, skip: tuple[str, ...]) -> int:
    if args.json:
        check_output(args.json, "--json")
    report = run(args.device, args.num_envs, args.repeats, args.episodes, args.threads, args.cycles, args.cache_images,
                 skip, args.memory, args.profile, log=lambda s: print(s, file=sys.stderr, flush=True),
                 import_rounds=args.imports, single_episodes=args.single_episodes)
    print(format_report(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return 0
