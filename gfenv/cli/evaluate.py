"""Benchmark agents on a gfenv task: anytime accuracy and multiply-adds after each glimpse, budgeted batch
classification, the oracle-normalised score, mean ± std over seeds; tables, JSON, a Markdown leaderboard and plots.

    python evaluate_agent.py --agents random,center,raster,oracle --episodes 1000 --json runs/eval/baselines.json
    python evaluate_agent.py --agents random,oracle,ppo=runs/seeds/ppo_s{seed} --seeds 0,1,2 \\
        --markdown runs/leaderboard/default.md --plots runs/leaderboard --pictures runs/leaderboard/patches.png
    python evaluate_agent.py --suite --agents random,center,raster,ppo=runs/suite/{env}/ppo_s{seed} --seeds 0,1,2 \
        --markdown runs/suite.md --json runs/suite.json

Agents: registered names (baselines get each seed) or LABEL=RUN_DIR for a trained stage-2 run; RUN_DIR may hold
{seed} (each seed's own run) and {env} (the env id's name, e.g. GlanceFocus-v0). The oracle-normalised score
100 (agent - random) / (oracle - random) appears when random and oracle are both among the agents (the default
set has them; --suite and --leaderboard always add them). --suite runs the embedded tasks (stage-1 encoders shipped)
and prints a suite score per agent; --leaderboard does the same over every registered task whose data and checkpoint
are at hand.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium

from agents import AGENTS, make_agent
from gfenv import ENV_ID
from gfenv.checkpoint import atomic_write
from gfenv.cli import add_common_flags, run_command
from gfenv.env import GlanceFocusVectorEnv
from gfenv.eval.evaluation import DEFAULT_ACTION, benchmark, format_table, oracle_normalised, render_episodes
from gfenv.eval.leaderboard import LEGEND, format_budgeted, leaderboard_rows, markdown_leaderboard, markdown_report
from gfenv.eval.suite import check_suite_tasks, embedded_tasks, suite_markdown, suite_scores, suite_text
from gfenv.rollout import FIXED_ENV_KWARGS, agent_env_kwargs, check_action_mode
from gfenv.task import SPLIT_IDS, canonical_words, registered_words, task_words
from gfenv.train.runs import load_agent, read_config, run_folder
from gfenv.utils import argument, check_device, check_output, import_modules, keep_freed_memory, parse_kv

TRUST_HELP = ("load the trained runs' SB3 zips with SB3's own loader, which unpickles them and so RUNS ANY CODE a "
              "crafted file carries; only for runs you trust (a zip written elsewhere, or one gfenv cannot rebuild "
              "from its plain-text settings). Without it agents load from their weights (weights_only) and plain-text "
              "settings, and nothing in a run folder is unpickled")

REFERENCES = ("random", "oracle")


def gfenv_ids() -> list[str]:
    """The registered gfenv ids, without the per-split ids (``...-train-v0``, ``...-test-v0``) of each task."""
    return sorted(env_id for env_id in gymnasium.registry if env_id.startswith("gfenv/") and env_id not in SPLIT_IDS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", default="random,center,oracle",
                   help=f"comma-separated agents: registered names ({', '.join(sorted(AGENTS))}) or "
                        "LABEL=RUN_DIR for a trained stage-2 run (its best_model, else model); RUN_DIR may hold "
                        "{seed} and {env}")
    p.add_argument("--env", default=None,
                   help=f"registered env id naming the task (its words are the defaults; default: the env the trained "
                        f"agents' runs record, else {ENV_ID})")
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="K=V",
                   help="the task in the env's words over the env id's and the trained runs' (dataset=, data_root=, "
                        "canvas=, checkpoint=PATH, steps=, ...) and env settings (action=, grid=)")
    p.add_argument("--split", default="test", choices=("test", "val", "train"),
                   help="images the agents are scored on: test (the final evaluation), val (carved from train: for "
                        "choosing models and settings) or train; the budgeted thresholds are always fitted on train")
    p.add_argument("--episodes", type=argument("int", low=1), default=1000,
                   help="images per agent and seed (the first N, in order)")
    p.add_argument("--threshold-episodes", type=argument("int", low=0), default=None, metavar="N",
                   help="train images that fit the budgeted-classification thresholds (default: 2 x --episodes; "
                        "0: no budgeted evaluation)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=argument("int", low=0), default=None,
                       help="one seed (env reset and agents); default 0")
    seeds.add_argument("--seeds", default=None, metavar="S1,S2,...",
                       help="several seeds: results are mean ± std over them")
    p.add_argument("--num-envs", type=argument("int", low=1), default=250, help="images evaluated in parallel")
    p.add_argument("--device", default="cpu", help="torch device of the env and the agents (cpu, cuda, cuda:1)")
    p.add_argument("--static", default=None, metavar="PATH",
                   help="a static full-image model (train_agent.py --stage static) shown as a reference point")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--markdown", default=None, metavar="PATH", help="also write a Markdown leaderboard")
    p.add_argument("--plots", default=None, metavar="DIR", help="write anytime.png and budgeted.png there")
    p.add_argument("--pictures", default=None, metavar="PATH",
                   help="a PNG grid of test images (rows) x agents (columns) with each agent's patches")
    p.add_argument("--picture-images", type=argument("int", low=1), default=6, metavar="K",
                   help="images in --pictures")
    p.add_argument("--leaderboard", action="store_true",
                   help="run the agents on every env of --envs (default: all registered gfenv ids) and write the "
                        "leaderboard (--markdown); envs without data or checkpoint are skipped")
    p.add_argument("--suite", action="store_true",
                   help="the benchmark suite: the agents on every embedded task (or --envs), each task's accuracy at "
                        "each step, MACs and oracle-normalised score, and a suite score per agent (the mean normalised "
                        "score over the tasks, mean ± std over seeds); a LABEL=RUN_DIR template may hold {env}")
    p.add_argument("--envs", default=None, metavar="ID1,ID2", help="tasks of --suite or --leaderboard")
    p.add_argument("--gfnet-checkpoint", default=None, metavar="PATH",
                   help="print a report on an official GFNet checkpoint (.pth.tar) and exit")
    p.add_argument("--data-root", default=None, metavar="PATH", help="ImageNet folder for --gfnet-checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--trust-pickled-zip", action="store_true", help=TRUST_HELP)
    add_common_flags(p)
    return p


def parse_seeds(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[int]:
    if args.seeds is None:
        return [0 if args.seed is None else args.seed]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers >= 0, e.g. 0,1,2; got {args.seeds!r}.")
    if not seeds:
        parser.error("--seeds is empty; give e.g. --seeds 0,1,2.")
    if min(seeds) < 0:
        parser.error(f"--seeds {args.seeds}: seeds are integers >= 0.")
    return list(dict.fromkeys(seeds))


def parse_agents(text: str, parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """LABEL -> run-dir template (None for a registered agent), in the order given."""
    specs: dict[str, str | None] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        label, _, path = item.partition("=")
        label = label.strip()
        if label in specs:
            parser.error(f"Agent label {label!r} is given twice in --agents.")
        specs[label] = path.strip() if path else None
    unknown = [name for name, path in specs.items() if path is None and name not in AGENTS]
    if unknown or not specs:
        parser.error(f"Unknown agent(s) {', '.join(map(repr, unknown)) or '(none given)'}. "
                     f"Valid agents: {', '.join(sorted(AGENTS))}.")
    return specs


def run_dir(template: str, seed: int, env_id: str) -> Path:
    try:
        return Path(template.format(seed=seed, env=env_id.split("/")[-1]))
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"Run dir {template!r}: only {{seed}} and {{env}} may be filled in ({err}).") from err


def trained_runs(specs: dict[str, str | None], seeds: list[int], env_id: str) -> dict[str, dict]:
    """Per trained label: its run dirs (one per seed), training timesteps and env; FileNotFoundError/ValueError
    when a run dir is missing or was trained on another env."""
    runs = {}
    for label, template in specs.items():
        if template is None:
            continue
        dirs = [run_dir(template, s, env_id) for s in seeds]
        for seed, path in zip(seeds, dirs):
            if not path.exists():
                raise FileNotFoundError(f"Run dir {path} of agent {label!r} (seed {seed}) does not exist; train it "
                                        f"with python train_agent.py --stage 2 --seed {seed} --run-dir {path}.")
        config = read_config(run_folder(dirs[0]))
        trained_env = config.get("env", env_id)
        if trained_env != env_id:
            raise ValueError(f"Agent {label!r} ({dirs[0]}) was trained on {trained_env}, not {env_id}.")
        runs[label] = {"run_dirs": [str(d) for d in dirs], "n_timesteps": config.get("timesteps")}
    return runs


def shared_task(args: argparse.Namespace, specs: dict[str, str | None], seed: int) -> tuple[str, dict[str, Any]]:
    """The env id and the env words every agent of ``specs`` is scored with: ``--env`` (default: the env id the first
    trained run records, else the default task), its registered words, the task words that run was trained with
    (its data and stage-1 checkpoint: the baselines see what it saw), then ``--env-kwargs``, with ``{seed}`` in
    a value filled in. All of that read for ``seed``: each seed's runs may have their own stage-1 checkpoint."""
    env_id, words = args.env, {}
    template = next((t for t in specs.values() if t is not None), None)
    if template is not None:
        config = read_config(run_folder(run_dir(template, seed, args.env or ENV_ID)))
        env_id = env_id or config.get("env")
        words = task_words(config.get("env_kwargs") or {})
    env_id = env_id or ENV_ID
    if env_id not in gymnasium.registry:
        raise ValueError(f"Unknown env id {env_id!r}. Registered gfenv ids: {', '.join(gfenv_ids())}.")
    user = canonical_words(parse_kv(args.env_kwargs, "--env-kwargs"))
    user = {k: v.replace("{seed}", str(seed)) if isinstance(v, str) else v for k, v in user.items()}
    return env_id, {**registered_words(env_id), **words, **user}


def agent_factory(specs: dict[str, str | None], env_id: str, device: str, trust_pickled_zip: bool = False):
    """``make_agents(seed)``: baselines built with the seed, trained runs loaded from that seed's run dir."""
    loaded: dict[Path, Any] = {}

    def make_agents(seed: int) -> dict[str, Any]:
        agents = {}
        for label, template in specs.items():
            if template is None:
                agents[label] = make_agent(label, seed=seed)
            else:
                path = run_dir(template, seed, env_id)
                if path not in loaded:
                    trust = {"trust_pickled_zip": True} if trust_pickled_zip else {}
                    loaded[path] = load_agent(path, device=device, **trust)
                agents[label] = loaded[path]
        return agents

    return make_agents


def evaluate_static(path: str, env_kwargs: dict[str, Any], episodes: int, device: str, split: str) -> dict:
    from gfenv.train.static import evaluate_static as run_static  # optional module, imported only when asked

    result = run_static(path, env_kwargs, episodes, device=device, split=split)
    return {"checkpoint": str(path), **result}


def evaluate_env(args: argparse.Namespace, env_id: str, env_kwargs: dict[str, Any], specs: dict[str, str | None],
                 seeds: list[int], skipped: list[str] | None = None,
                 seed_kwargs: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The benchmark of one env: every agent over every seed (``gfenv.eval.evaluation.benchmark``), the static point.
    With ``skipped`` (a list), a static model that does not fit the env is noted there instead of raising.
    ``seed_kwargs``: each seed's own env words where they differ (``env_kwargs`` is the first seed's)."""
    runs = trained_runs(specs, seeds, env_id)
    make_agents = agent_factory(specs, env_id, args.device, args.trust_pickled_zip)
    score_fn = oracle_normalised if all(r in specs for r in REFERENCES) else None
    threshold_episodes = 2 * args.episodes if args.threshold_episodes is None else args.threshold_episodes
    words = seed_kwargs.__getitem__ if seed_kwargs else env_kwargs
    results = benchmark(make_agents, words, args.episodes, seeds, threshold_episodes, args.num_envs,
                        args.device, progress=not args.no_progress, score_fn=score_fn, split=args.split)
    for label, run in runs.items():
        results[label].update(run)
    report = {"env": env_id, "env_kwargs": env_kwargs, **({"env_kwargs_per_seed": seed_kwargs} if seed_kwargs else {}),
              "split": args.split, "episodes": args.episodes,
              "seed": seeds[0], "seeds": seeds, "threshold_episodes": threshold_episodes, "agents": results}
    if args.static:
        path = run_dir(args.static, seeds[0], env_id).as_posix()
        try:
            report["static"] = evaluate_static(path, env_kwargs, args.episodes, args.device, args.split)
        except (ValueError, FileNotFoundError) as err:
            if skipped is None:
                raise
            skipped.append(f"static {path} on {env_id}: {err}")
            print(f"skipping static {path} on {env_id}: {err}")
    if args.pictures:
        agents = make_agents(seeds[0])
        report["pictures"] = {label: render_episodes(agent, env_kwargs, args.picture_images, seeds[0], args.device,
                                                     split=args.split) for label, agent in agents.items()}
    return report


def print_report(report: dict[str, Any]) -> None:
    results = report["agents"]
    print(format_table(results))
    parts = next(iter(results.values()))["macs_parts"]
    print("MACs per image of one call: " + ", ".join(f"{k.replace('_', ' ')} {v / 1e6:.3f} M" for k, v in parts.items()
                                                      if k != "policy"))
    policies = {label: r["policy_macs_per_step"] for label, r in results.items() if r["policy_macs_per_step"]}
    if policies:
        print("policy MACs per decision: " + ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in policies.items()))
    if not any("score" in r for r in results.values()):
        print("(no oracle-normalised score: add random and oracle to --agents)")
    budgeted = format_budgeted(results)
    if budgeted:
        print(budgeted)
    static = report.get("static")
    if static:
        print(f"static reference {static['checkpoint']}: {static['accuracy']:.2f} % at {static['macs'] / 1e6:.2f} M "
              f"MACs per image")


def json_safe(value: Any) -> Any:
    """The report without NaN/inf (JSON null) and without pictures."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items() if k != "pictures"}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_outputs(args: argparse.Namespace, report: dict[str, Any], suffix: str = "") -> None:
    """Plots and pictures of one env's report (``suffix`` tells envs apart in --leaderboard mode)."""
    title = f"{report['env']}, {report['episodes']} {report['split']} images, seeds {report['seeds']}"
    if args.plots or args.pictures:
        from gfenv.eval.plots import plot_anytime, plot_budgeted, plot_patches  # matplotlib only when asked

        if args.plots:
            folder = Path(args.plots)
            plot_anytime(report["agents"], folder / f"anytime{suffix}.png", report.get("static"), title=title)
            if any(r.get("budgeted") for r in report["agents"].values()):
                plot_budgeted(report["agents"], folder / f"budgeted{suffix}.png", report.get("static"), title=title)
        if args.pictures:
            path = Path(args.pictures)
            plot_patches(report["pictures"], path.with_name(f"{path.stem}{suffix}{path.suffix or '.png'}"),
                         title=f"{report['env']}: focus patches in order (seed {report['seeds'][0]})")


def write_text(path: str, text: str) -> None:
    """``text`` to ``path`` atomically (``gfenv.checkpoint.atomic_write``): an interrupted write leaves no half file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def run_suite(args: argparse.Namespace, specs: dict[str, str | None], seeds: list[int], command: str) -> int:
    """``--suite`` (the embedded tasks, or ``--envs``; a task that cannot run is refused before anything runs) and
    ``--leaderboard`` (every registered task, or ``--envs``; tasks without data or checkpoint are skipped): every agent
    on every task, each task's table, and the suite score per agent."""
    registered = gfenv_ids()
    envs = [e.strip() for e in args.envs.split(",") if e.strip()] if args.envs else (
        embedded_tasks() if args.suite else registered)
    if args.suite:
        check_suite_tasks(envs, registered)
    unknown = [e for e in envs if e not in registered]
    if unknown:
        raise ValueError(f"Unknown env id(s) {', '.join(unknown)}. Registered gfenv ids: {', '.join(registered)}.")
    specs = {**{r: None for r in REFERENCES if r not in specs}, **specs}
    rows, reports, skipped = [], {}, []
    for env_id in envs:
        env_kwargs = {**registered_words(env_id), **canonical_words(parse_kv(args.env_kwargs, "--env-kwargs"))}
        try:
            GlanceFocusVectorEnv(num_envs=1, split=args.split, **env_kwargs).close()
        except (FileNotFoundError, ValueError, OSError) as err:
            skipped.append(f"{env_id}: {err}")
            print(f"skipping {env_id}: {err}")
            continue
        usable = {}
        for label, template in specs.items():
            try:
                trained_runs({label: template}, seeds, env_id)
                agent = agent_factory({label: template}, env_id, args.device)(seeds[0])[label]
                check_action_mode(agent, agent_env_kwargs(agent, env_kwargs).get("action", DEFAULT_ACTION), label)
                usable[label] = template
            except (FileNotFoundError, ValueError) as err:
                skipped.append(f"{label} on {env_id}: {err}")
                print(f"skipping {label} on {env_id}: {err}")
        print(f"== {env_id}")
        report = evaluate_env(args, env_id, env_kwargs, usable, seeds, skipped)
        print_report(report)
        write_outputs(args, report, suffix="_" + env_id.split("/")[-1])
        reports[env_id] = report
        rows += leaderboard_rows(env_id, report["agents"], report.get("static"))
    scores = suite_scores(reports)
    print(suite_text(scores, list(reports)))
    order = list(dict.fromkeys(row["algo"] for row in rows))
    rows.sort(key=lambda row: (order.index(row["algo"]), row["env_id"]))
    text = "\n".join(["# gfenv benchmark suite" if args.suite else "# gfenv leaderboard", "",
                      f"{args.episodes} {args.split} images per seed, seeds {', '.join(map(str, seeds))}.", "", "```",
                      command, "```", "", markdown_leaderboard(rows), "", LEGEND, "",
                      suite_markdown(scores, list(reports)),
                      *(["", "Skipped:", "", *(f"- {s}" for s in skipped)] if skipped else [])]) + "\n"
    if args.markdown:
        write_text(args.markdown, text)
    if args.json:
        write_text(args.json, json.dumps(json_safe({"envs": reports, "suite": scores, "skipped": skipped}),
                                         indent=2) + "\n")
    return 0


def gfnet_checkpoint(args: argparse.Namespace) -> int:
    from gfenv.eval.official import gfnet_checkpoint_report

    print(gfnet_checkpoint_report(args.gfnet_checkpoint, data_root=args.data_root, device=args.device))
    return 0


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs that cannot be written (``--json``, ``--markdown``, ``--pictures``: files;
    ``--plots``: a folder)."""
    for flag, path, folder in (("--json", args.json, False), ("--markdown", args.markdown, False),
                               ("--pictures", args.pictures, False), ("--plots", args.plots, True)):
        if path is not None:
            check_output(path, flag, folder=folder)


def main(argv: list[str] | None = None) -> int:
    """Evaluate; a user error prints one line and returns 2 (``--debug``: the traceback), Ctrl-C returns 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if run_command(lambda a: import_modules(a.imports) or 0, args):
        return 2
    keep_freed_memory()  # no page faults on the env's big per-step tensors (gfenv.utils)
    if args.gfnet_checkpoint:
        return run_command(lambda a: (check_device(a.device, "--device"), gfnet_checkpoint(a))[1], args)
    specs = parse_agents(args.agents, parser)
    seeds = parse_seeds(args, parser)
    args.command = "python evaluate_agent.py " + shlex.join(argv)
    return run_command(partial(evaluate_command, specs=specs, seeds=seeds), args)


def evaluate_command(args: argparse.Namespace, specs: dict[str, str | None], seeds: list[int]) -> int:
    check_device(args.device, "--device")
    check_outputs(args)
    start = time.time()
    if args.leaderboard or args.suite:
        code = run_suite(args, specs, seeds, args.command)
        print(f"wall time {time.time() - start:.0f} s")
        return code
    env_id, env_kwargs = shared_task(args, specs, seeds[0])
    fixed = sorted(set(FIXED_ENV_KWARGS) & set(env_kwargs))
    if fixed:
        raise ValueError(f"--env-kwargs {', '.join(f'{k}={env_kwargs[k]!r}' for k in fixed)}: evaluate_agent.py sets "
                         f"{', '.join(fixed)} itself (the images: --split, --episodes; the slots: --num-envs; "
                         f"--device; --seed); drop {'them' if len(fixed) > 1 else 'it'} from --env-kwargs.")
    trained_runs(specs, seeds, env_id)  # every seed's run folder exists (else an error naming the missing one)
    # each seed's task: its runs may have their own stage-1 checkpoint
    per_seed = {seeds[0]: env_kwargs, **{s: shared_task(args, specs, s)[1] for s in seeds[1:]}}
    seed_kwargs = per_seed if any(kw != env_kwargs for kw in per_seed.values()) else None
    # the task built before any agent loads: a bad word (unknown, wrong type or range) fails now
    for kw in (seed_kwargs or {seeds[0]: env_kwargs}).values():
        GlanceFocusVectorEnv(num_envs=1, split=args.split, device=args.device, **kw).close()
    report = evaluate_env(args, env_id, env_kwargs, specs, seeds, seed_kwargs=seed_kwargs)
    print_report(report)
    write_outputs(args, report)
    if args.json:
        write_text(args.json, json.dumps(json_safe(report), indent=2, default=str) + "\n")
    if args.markdown:
        write_text(args.markdown, markdown_report(env_id, report, args.command))
    print(f"wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
