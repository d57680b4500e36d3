"""What the classifier reads from well-placed patches on a cluttered canvas: a privileged "object" policy.

    python benchmarks/object_patches.py --env gfenv/FashionMNIST60-v0 --env-kwargs data_root=DATA \\
        checkpoint=RUN/model.pt [--episodes 2000] [--split test|val|train] [--confident]

On a cluttered canvas (a task whose dataset takes ``canvas=``, e.g. ``gfenv/FashionMNIST60-v0``) the base image's
place is a pure function of the image's index (``ClutteredCanvasSource.object_corners``), so this script knows where
the object lies: privileged information, like the oracle's labels. Its ``object`` policy takes the grid cell whose
patch is centred on the object (the grid position nearest to that patch's corner, ties to even), then the four
diagonal neighbours of that cell (the object's corners); a cell clamped onto one already visited becomes the first
unvisited cell in row-major order.
Printed beside ``random`` and ``center`` on the same images (``gfenv.eval.evaluation.evaluate``: the first
``--episodes`` images of ``--split``, in order): the accuracy after each glimpse, i.e. what a policy that finds the
object reaches with this classifier.

``--confident`` adds a label-free greedy reference: each step the unvisited cell after which the classifier is most
confident (max softmax). It reads every cell's patch each step, so it is a reference, not an agent to deploy.

Grid actions (``action=grid``: lockstep episodes) and live encoders (no ``cache=``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import gymnasium
import torch

from agents import make_agent
from agents.base import Agent
from agents.baselines import cells_to_actions, decision_index, unvisited_argmax
from gfenv.datasets import ClutteredCanvasSource
from gfenv.env import GlanceFocusVectorEnv
from gfenv.eval.evaluation import evaluate
from gfenv.glimpse import crop
from gfenv.models import encode
from gfenv.task import canonical_words, recorded_task, registered_words, resolve_task, task_words
from gfenv.utils import argument, parse_kv


def canvas_source(env: GlanceFocusVectorEnv) -> ClutteredCanvasSource:
    source = env.source
    if not isinstance(source, ClutteredCanvasSource):
        raise ValueError(f"{env.task.env_id or 'this task'} is not a cluttered canvas ({type(source).__name__}): the "
                         "object's place is known on a canvas only (a task with canvas=..., e.g. "
                         "gfenv/FashionMNIST60-v0).")
    return source


class ObjectAgent(Agent):
    """The cell whose patch is centred on the object, then its four diagonal neighbours (privileged)."""

    name = "object"
    OFFSETS = ((0, 0), (-1, -1), (-1, 1), (1, -1), (1, 1))

    def act(self, obs: Any, env: GlanceFocusVectorEnv) -> torch.Tensor:
        source, g = canvas_source(env), env.grid
        h, w = source.base.image_shape[1:]
        centre = source.object_corners(env.index).float() + torch.tensor([h / 2, w / 2], device=env.device)
        wanted_corner = centre - env.patch_size / 2  # the patch corner that centres the object
        # its place on the G x G grid of evenly spaced corners (gfenv.glimpse.grid_corners), rounded (half to even)
        span = torch.tensor([env.height - env.patch_size, env.width - env.patch_size], device=env.device)
        ij = (wanted_corner / span.clamp(min=1) * (g - 1)).round().clamp(0, g - 1).long()
        offsets = torch.tensor(self.OFFSETS, device=env.device)
        ij = (ij + offsets[decision_index(env).clamp(max=len(self.OFFSETS) - 1)]).clamp(0, g - 1)
        wanted = ij[:, 0] * g + ij[:, 1]
        cells = g * g
        # the wanted cell first, then the others in row-major order (a clamped repeat becomes an unvisited cell)
        scores = -torch.arange(cells, device=env.device, dtype=torch.float32).expand(env.num_envs, cells).clone()
        scores[torch.arange(env.num_envs, device=env.device), wanted] = float(cells)
        return cells_to_actions(unvisited_argmax(scores, env.visited), env)


class ConfidentAgent(Agent):
    """Label-free greedy: each step the unvisited cell after which the classifier is most confident (max softmax);
    it reads every cell's patch, so it is a reference, not an agent to deploy."""

    name = "confident"

    @torch.no_grad()
    def act(self, obs: Any, env: GlanceFocusVectorEnv) -> torch.Tensor:
        n, cells = env.num_envs, env.grid * env.grid
        patches = crop(env.images.repeat_interleave(cells, 0), env.corners.repeat(n, 1), env.patch_size)
        feats, _ = encode(env.model.focus_encoder, patches)
        t = int(env.t[0])  # lockstep grid episodes: every slot has taken t glimpses
        logits, _ = env.model.classifier.step(feats, env.memory.repeat_interleave(cells, 0), t)
        confidence = logits.float().softmax(1).amax(1).reshape(n, cells)
        return cells_to_actions(unvisited_argmax(confidence, env.visited), env)


def command_words(env_id: str | None, env_kwargs: list[str]) -> dict[str, Any]:
    """The env words of the command line: ``--env``'s registered words (default: the env id the checkpoint
    records), then ``--env-kwargs``; grid actions unless a grid mode is named."""
    user = canonical_words(parse_kv(env_kwargs, "--env-kwargs"))
    if env_id is None and user.get("checkpoint") not in (None, "default"):
        env_id = recorded_task(user["checkpoint"])[0]
    if env_id is not None and env_id not in gymnasium.registry:
        known = sorted(e for e in gymnasium.registry if e.startswith("gfenv/"))
        raise ValueError(f"--env {env_id}: no such env id. Registered gfenv ids: {', '.join(known)}.")
    words = {**(registered_words(env_id) if env_id else {}), **user}
    words.setdefault("action", "grid")
    if words["action"] != "grid":
        raise ValueError(f"action={words['action']!r}: the object policy takes grid cells in lockstep episodes; use "
                         "action=grid.")
    if words.get("cache") is not None:
        raise ValueError("cache=...: the object and confident policies read live patches; drop cache.")
    return words


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default=None, help="registered env id naming the task (default: the checkpoint's)")
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="K=V",
                   help="the task in the env's words (data_root=, checkpoint=PATH, canvas=, ...)")
    p.add_argument("--episodes", type=argument("int", low=1), default=2000, help="the first N images of the split")
    p.add_argument("--split", default="test", choices=("test", "val", "train"))
    p.add_argument("--seed", type=argument("int", low=0), default=0)
    p.add_argument("--num-envs", type=argument("int", low=1), default=250, help="images evaluated in parallel")
    p.add_argument("--device", default="cpu")
    p.add_argument("--confident", action="store_true", help="also the label-free greedy max-confidence reference")
    args = p.parse_args(argv)
    try:
        words = command_words(args.env, args.env_kwargs)
        spec = resolve_task(task_words(words))  # the data and checkpoint these words name, checked
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    if "canvas" not in spec.dataset_words:
        p.error(f"{spec.env_id or spec.dataset} has no canvas: the object's place is known on a cluttered canvas "
                "only (a task with canvas=..., e.g. gfenv/FashionMNIST60-v0).")
    agents: dict[str, Any] = {"object": ObjectAgent(), "random": make_agent("random", seed=args.seed),
                              "center": make_agent("center")}
    if args.confident:
        agents["confident"] = ConfidentAgent()
    results = evaluate(agents, words, args.episodes, args.seed, num_envs=args.num_envs, device=args.device,
                       progress=False, split=args.split)
    print(f"{args.episodes} {args.split} images of {spec.env_id or spec.dataset}, model {spec.checkpoint}, "
          f"seed {args.seed}; accuracy (%) after each glimpse")
    steps = next(iter(results.values()))["steps"]
    print(f"{'':<10}" + "".join(f"{f't={t}':>8}" for t in range(1, steps + 1)))
    for label, result in results.items():
        print(f"{label:<10}" + "".join(f"{a:8.2f}" for a in result["accuracy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
