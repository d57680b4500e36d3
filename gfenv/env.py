"""The Glance-and-Focus environment: choosing where to look next is the action, the classifier's gain the reward.

``GlanceFocusVectorEnv`` is batched from the start: one image per slot and every slot stepped by one set of tensor
ops on the device. ``GlanceFocusEnv`` is its single-env view (a batch of one, numpy at the boundary) for
Gymnasium's and Stable-Baselines3's checkers and for plain ``gymnasium.make``.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import VectorEnv
from gymnasium.vector.utils import batch_space
from gymnasium.vector.vector_env import AutoresetMode

from gfenv.cache import CACHE_MODES, FeatureCache
from gfenv.checkpoint import load_model
from gfenv.data import SPLITS
from gfenv.flops import model_macs
from gfenv.glimpse import GLANCE_MODES, check_patch_size, crop, glance, grid_corners, location_to_corner
from gfenv.models import encode
from gfenv.rewards import Reward, RewardFn, check_finite
from gfenv.task import ASSETS, TASKS, resolve_task
from gfenv.utils import InvalidType, check_choice, check_device, check_int, check_text

ACTION_MODES = ("continuous", "grid", "grid+stop")
GRID_MODES = tuple(m for m in ACTION_MODES if m != "continuous")  # discrete modes: a grid cell (or stop) per step
OBSERVATION_MODES = ("dict", "gfnet", "flat")
DEFAULT_CHECKPOINT = ASSETS / "glyphs_small_cnn.pt"
PREFETCH = 32  # images a one-slot env draws ahead (its episodes are unchanged: _next_single_image)
FEATURE_BOUND = 1e6  # finite stand-in for unbounded features: SB3's checker refuses infinite Box bounds


def _state_safe(fn):
    """Run a public env method (``reset``, ``step``, ``cell_confidences``; the internals they call rely on it) under
    ``torch.no_grad()`` and never in inference mode: some of the env's state tensors are updated in place on later
    calls, and the observations (state tensors themselves) go to agents' autograd, so they must not become inference
    tensors when a caller steps the env inside ``torch.inference_mode()`` (e.g. an evaluation) and then outside it
    (e.g. training)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return fn(*args, **kwargs)
        if not torch.is_grad_enabled():  # the common case inside a training loop's no_grad: nothing to switch
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


class GlanceFocusVectorEnv(VectorEnv):
    """
    ## Description
    GFNet (Glance and Focus, Wang et al., NeurIPS 2020) as a reinforcement-learning problem. Each episode is one
    image. At reset the env takes a *glance*: the whole image resized to P x P, read by the frozen glance encoder
    and the recurrent classifier. Each step the agent chooses where to take a *focus* patch (a P x P crop at full
    resolution); the frozen focus encoder reads it and the classifier updates its belief. The reward is what the
    patch was worth to the classifier. Encoders and classifier come from a stage-1 checkpoint (shipped for the
    default task), so the env needs no training. All slots live on ``device`` as torch tensors and step together.

    ## Action Space
    - ``action="continuous"`` (default): ``Box(-1, 1, (2,), float32)``, the location (a_y, a_x) mapped to GFNet's
      [0, 1]^2 by (a + 1) / 2; the patch's top-left corner is (floor(a_y (H - P)), floor(a_x (W - P))). Values
      outside [-1, 1] are clipped, as GFNet clips its sampled actions. NaN or inf is refused.
    - ``action="grid"``: ``Discrete(G * G)``, cell k = i * G + j of a G x G grid of evenly spaced patches;
      ``action_masks()`` marks the cells not yet visited (for MaskablePPO).
    - ``action="grid+stop"``: ``Discrete(G * G + 1)``; the last action stops the episode early (learned exit).

    ## Observation Space
    ``observation="dict"`` (default), a one-level Dict of flat float32 Boxes:
    - ``glance``: the glance encoder's last spatial feature map (D, h, w), flattened (``glance_map_shape``);
    - ``focus``: the pooled features (D,) of the latest glimpse (the glance's right after reset);
    - ``memory``: the classifier's recurrent state (GRU hidden state, or the cascaded classifier's features);
    - ``visited``: a G x G map (flattened) with 1 where a focus patch was already taken;
    - ``step``: the fraction of glimpses taken, t / T.
    ``observation="gfnet"``: GFNet's exact policy input, the previous glimpse's spatial feature map, flattened.
    ``observation="flat"``: the Dict's entries concatenated into one Box. Unbounded features are declared with
    the finite bounds +-1e6. Observations are tensors on ``device``; the env never writes into a tensor it returned,
    but to save copies the ``glance`` map is one tensor for a whole episode (like ``SyncVectorEnv(copy=False)``):
    clone an observation before writing into it. The single env (``GlanceFocusEnv``) returns numpy copies.

    ## Rewards
    ``reward="confidence_gain"`` (default, GFNet): p_t(y) - p_{t-1}(y), the change of the classifier's softmax
    probability of the true class. Also ``log_confidence_gain``, ``final_correct`` (RAM), ``vs_random``
    (AdaFocus), ``entropy_drop`` (label-free), or any callable (see ``gfenv.rewards``). ``mac_cost`` subtracts
    ``mac_cost`` per million multiply-adds that a step costs.

    ## Starting State
    Each slot draws an image of the split (uniformly at random, or in order with ``sampling="sequential"``) and
    takes the glance: t = 1 of T glimpses.

    ## Episode End
    Terminated after T glimpses (T - 1 focus steps) or when the stop action is taken. Never truncated (the
    registrations declare ``max_episode_steps`` = T - 1). The info dict carries, every step, ``prediction``,
    ``confidence`` (max probability), ``true_confidence``, ``correct``, the cumulative ``macs`` and ``glimpses`` (the
    glimpses taken, glance included) of each slot, and in the grid modes ``action_mask`` ((N, A) bool, the actions
    allowed next: ``action_masks()`` as a tensor).
    Autoreset mode NEXT_STEP by default: the step after an episode ends resets that slot and ignores its action.
    SAME_STEP resets it within the step that ends it (``final_obs``/``final_info``, as SB3 and TorchRL need);
    DISABLED leaves it to ``reset(options={"reset_mask": mask})``.

    ## Arguments
    ``gymnasium.make_vec("gfenv/GlanceFocus-v0", num_envs=N, **kwargs)``. The task, in flat words (``gfenv.task``):
    ``dataset`` ("glyphs"; see ``gfenv.data.DATASETS``), ``data_root`` (folder of a real dataset), the dataset's
    own words (``canvas``, ``fragments``, ``fragment_size``, ``image_size``, ``train_size``, ``val_size``, ...; also
    accepted as ``dataset_kwargs={...}``, a word given both ways with two values is refused), ``checkpoint``
    (stage-1 model; default: the shipped one of a task that has one; a checkpoint that records its task names the
    data too), ``backbone`` / ``patch_size`` / ``classifier`` / ``hidden`` / ``glance_mode`` / ``num_classes``
    (checked against the checkpoint), ``steps`` (T, default the checkpoint's). How episodes run: ``split``
    ("train", "val" (carved from train) or "test"), ``action``, ``grid`` (G, default 7), ``observation``,
    ``reward``, ``mac_cost``, ``sampling``, ``device``, ``seed``, ``render_mode`` ("rgb_array"), ``autoreset_mode``
    (fixed for the env's lifetime), ``cache``, ``cache_dir``, ``cache_images``. ``max_episode_steps`` (T - 1, as
    ``gymnasium.make_vec`` passes it from the registration: ``steps`` wins over the registered value). Grid actions
    are (N,) cell indices, or (N, A) one-hot rows (TorchRL's ``OneHot`` spec).

    ## Version History
    - v0: initial release.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 2, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 16, dataset: str | None = None, data_root: str | None = None,
                 dataset_kwargs: dict | None = None, split: str = "train", checkpoint: str | Path | None = None,
                 backbone: str | None = None, patch_size: int | None = None, num_classes: int | None = None,
                 steps: int | None = None, classifier: str | None = None, hidden: int | None = None,
                 glance_mode: str | None = None, action: str = "continuous", grid: int = 7, observation: str = "dict",
                 reward: str | RewardFn = "confidence_gain", mac_cost: float = 0.0, sampling: str = "random",
                 device: str | torch.device = "cpu", seed: int | None = None, render_mode: str | None = None,
                 autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP, max_episode_steps: int | None = None,
                 cache: str | None = None, cache_dir: str | Path | None = None, cache_images: int | None = None,
                 model=None, source=None, **dataset_words):
        # every argument checked (type and range) before anything is loaded, each error naming it
        num_envs = check_int("num_envs", num_envs, 1)
        check_choice("split", split, SPLITS)
        check_choice("action", action, ACTION_MODES)
        check_choice("observation", observation, OBSERVATION_MODES)
        check_choice("sampling", sampling, ("random", "sequential"))
        check_choice("render_mode", render_mode, ("rgb_array",), none=True)
        if cache is not None and (not isinstance(cache, str) or cache not in CACHE_MODES):
            raise ValueError(f"Unknown cache {cache!r} (cache=): choose one of {CACHE_MODES}, or None for live "
                             "encoders.")
        check_choice("glance_mode", glance_mode, GLANCE_MODES, none=True)
        for name, value in (("dataset", dataset), ("backbone", backbone), ("classifier", classifier)):
            check_text(name, value, none=True)
        for name, value in (("data_root", data_root), ("checkpoint", checkpoint), ("cache_dir", cache_dir)):
            check_text(name, value, none=True, path=True)
        patch_size = check_int("patch_size", patch_size, 1, none=True)
        num_classes = check_int("num_classes", num_classes, 2, none=True)
        steps = check_int("steps", steps, 2, none=True, hint="T, the glance and at least one focus patch; None: "
                                                            "the checkpoint's")
        hidden = check_int("hidden", hidden, 1, none=True)
        grid = check_int("grid", grid, 1)
        seed = check_int("seed", seed, 0, none=True)
        max_episode_steps = check_int("max_episode_steps", max_episode_steps, 1, none=True)
        cache_images = check_int("cache_images", cache_images, 1, none=True)
        check_device(device)
        if not isinstance(autoreset_mode, AutoresetMode):
            valid = [m.value for m in AutoresetMode]
            if autoreset_mode not in valid:
                raise ValueError(f"autoreset_mode={autoreset_mode!r}: must be an AutoresetMode or one of {valid}.")
        if cache is not None and action == "continuous":
            raise ValueError("The feature cache holds the grid cells' features: use action='grid' (or "
                             "'grid+stop') with cache, or cache=None for continuous actions.")
        reward_fn = Reward(reward, mac_cost)  # checks the reward's name or signature and mac_cost
        self.device = torch.device(device)
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.action_mode, self.observation_mode, self.sampling = action, observation, sampling
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        words = {"dataset": dataset, "data_root": data_root, "dataset_kwargs": dataset_kwargs, "checkpoint": checkpoint,
                 "backbone": backbone, "patch_size": patch_size, "steps": steps, "classifier": classifier,
                 "hidden": hidden, "glance_mode": glance_mode, **dataset_words}
        self.task = resolve_task(words, need_checkpoint=model is None)  # the data and model these words name
        if model is None and self.task.checkpoint.name.endswith(".pth.tar"):  # GFNet-Pytorch's released files
            model, source = _official_model(self.task, split, self.device, source)
        self.source = source if source is not None else self.task.source(split, self.device)
        c, h, w = self.source.image_shape
        if model is None:
            expect = {k: v for k, v in self.task.model_words.items() if k != "steps"}
            expect.update(num_classes=num_classes or self.source.num_classes, in_channels=c)
            model, _ = load_model(self.task.checkpoint, expect=expect, map_location=self.device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        cfg = self.model.config
        self.patch_size, self.num_classes, self.height, self.width = cfg.patch_size, cfg.num_classes, h, w
        check_patch_size(self.patch_size, h, w)
        self.steps = cfg.steps if steps is None else steps
        if self.steps < 2:
            raise ValueError(f"steps={self.steps}: an episode needs the glance and at least one focus patch (T >= 2).")
        if cfg.classifier == "cascaded" and self.steps > cfg.steps:
            raise ValueError(f"The cascaded classifier has {cfg.steps} heads; steps={self.steps} is too many.")
        if max_episode_steps is not None and max_episode_steps != self.steps - 1:
            registered = TASKS[self.task.env_id].steps - 1 if self.task.env_id in TASKS else None
            if steps is None or max_episode_steps != registered:  # else: the registration's, passed on by make_vec
                raise ValueError(f"max_episode_steps={max_episode_steps} disagrees with steps={self.steps} "
                                 f"(an episode is T - 1 = {self.steps - 1} focus steps); set steps instead.")
        self.grid = grid
        self.reward_fn = reward_fn
        if cache is not None and self.reward_fn.needs_random:
            raise ValueError(f"Reward {self.reward_fn.name!r} compares with a random continuous glimpse, which the "
                             "feature cache does not hold; use cache=None with it.")
        self.corners = grid_corners(self.grid, h, w, self.patch_size, self.device)  # (G*G, 2)
        self._span = (max(h - self.patch_size, 1), max(w - self.patch_size, 1))
        # per-step constants, made once on the device (no host->device copy in a step)
        self._corner_scale = torch.tensor([h - self.patch_size, w - self.patch_size], dtype=torch.float32,
                                          device=self.device)
        self._span_t = torch.tensor(self._span, dtype=torch.float32, device=self.device)
        self._cell_strides = torch.tensor([self.grid, 1], device=self.device)
        self.cache = None
        if cache is not None:
            self.cache = FeatureCache.build(self.model, self.source, self.corners, self.patch_size, cache_images,
                                            cache, cache_dir, with_cell_maps=observation == "gfnet")
        self._num_images = len(self.cache) if self.cache is not None else len(self.source)


        macs = model_macs(self.model, self.source.image_shape)
        self.macs = {k: int(v) for k, v in macs.items()}
        self.glance_macs = self.macs["glance_encoder"] + self.macs["classifier"]
        self.focus_macs = self.macs["focus_encoder"] + self.macs["classifier"]
        self._focus_macs = torch.full((self.num_envs,), float(self.focus_macs), device=self.device)  # a step's MACs
        self._rows = torch.arange(self.num_envs, device=self.device)

        with torch.no_grad():
            probe = torch.zeros(1, c, self.patch_size, self.patch_size, device=self.device)
            _, fmap = encode(self.model.glance_encoder, probe)
            encode(self.model.focus_encoder, probe)  # builds the folded copy now, not inside the first (sync-free) step
        self.feature_dim = self.model.feature_dim
        self.glance_map_shape = tuple(fmap.shape[1:])  # (D, h, w)
        self.state_dim = self.model.classifier.state_dim
        self._build_spaces()

        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(int(seed) if seed is not None else int(torch.randint(2**31, (1,)).item()))
        self._cursor = 0
        self._ahead: list | None = None  # a one-slot env's images drawn ahead (_next_single_image)
        self.lockstep = action != "grid+stop"  # every slot's episode starts and ends together
        self.stop_action = self.grid * self.grid if action == "grid+stop" else None  # the action that stops
        # on CUDA, early-stopped slots are reset by masks over all slots (no nonzero(): no device->host sync)
        self._masked_resets = self.device.type == "cuda" and sampling == "random"
        self._t_host = 0
        n, dev = self.num_envs, self.device
        self.images = torch.zeros(n, c, h, w, device=dev)
        self._own_images = True  # False while self.images is the source's batch itself (after a full reset)
        self.labels = torch.zeros(n, dtype=torch.long, device=dev)
        self.index = torch.zeros(n, dtype=torch.long, device=dev)  # the image's index in the split
        self.t = torch.zeros(n, dtype=torch.long, device=dev)
        self.memory = torch.zeros(n, self.state_dim, device=dev)
        self.probs = torch.full((n, self.num_classes), 1.0 / self.num_classes, device=dev)
        self.glance_map = torch.zeros(n, *self.glance_map_shape, device=dev)
        self.last_map = torch.zeros(n, *self.glance_map_shape, device=dev)
        self.last_features = torch.zeros(n, self.feature_dim, device=dev)
        self.visited = torch.zeros(n, self.grid * self.grid, dtype=torch.bool, device=dev)
        self.done = torch.zeros(n, dtype=torch.bool, device=dev)
        self.cum_macs = torch.zeros(n, dtype=torch.float64, device=dev)
        self.history = torch.full((n, self.steps - 1, 2), -1, dtype=torch.long, device=dev)  # patch corners
        self._cell_features: torch.Tensor | None = None

    # -------------------------------------------------------------------------------------------------- spaces
    def _build_spaces(self) -> None:
        def box(size: int, low: float = -FEATURE_BOUND, high: float = FEATURE_BOUND) -> spaces.Box:
            return spaces.Box(low, high, (size,), np.float32)

        d, g = self.feature_dim, self.grid
        map_size = int(np.prod(self.glance_map_shape))
        parts = {"glance": box(map_size), "focus": box(d), "memory": box(self.state_dim),
                 "visited": box(g * g, 0.0, 1.0), "step": box(1, 0.0, 1.0)}
        if self.observation_mode == "dict":
            single_obs = spaces.Dict(parts)
        elif self.observation_mode == "gfnet":
            single_obs = box(map_size)
        else:
            size = sum(s.shape[0] for s in parts.values())
            low = np.concatenate([s.low for s in parts.values()])
            high = np.concatenate([s.high for s in parts.values()])
            single_obs = spaces.Box(low, high, (size,), np.float32)
        if self.action_mode == "continuous":
            single_act = spaces.Box(-1.0, 1.0, (2,), np.float32)
        else:
            single_act = spaces.Discrete(g * g + (self.action_mode == "grid+stop"))
        self.single_observation_space = single_obs
        self.single_action_space = single_act
        self.observation_space = batch_space(single_obs, self.num_envs)
        self.action_space = batch_space(single_act, self.num_envs)

    # --------------------------------------------------------------------------------------------- internals
    def _draw(self, count: int) -> torch.Tensor:
        if self.sampling == "sequential":
            idx = (self._cursor + torch.arange(count, device=self.device)) % self._num_images
            self._cursor = (self._cursor + count) % self._num_images
            return idx
        return torch.randint(self._num_images, (count,), generator=self._gen, device=self.device)

    def _get_images(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.source.get(idx)
        if not self.source.finite_by_construction:
            check_finite(images, "The image source returned NaN or inf pixels; clean the data (or its transform).")
        if labels.numel():
            _check_labels(labels, self.num_classes)
        return images, labels

    def _next_single_image(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, image, label) of a one-slot env's next episode, read from a batch of ``PREFETCH`` images drawn
        ahead: a source draws a batch of images in about the time of one, and the draws are those one at a time
        would make (the same generator calls, the same order), so the episodes are the same."""
        if self._ahead is None or self._ahead[3] >= len(self._ahead[0]):
            idx = self._draw(PREFETCH)
            self._ahead = [idx, *self._get_images(idx), 0]
        idx, images, labels, k = self._ahead
        self._ahead[3] = k + 1
        return idx[k:k + 1], images[k:k + 1], labels[k:k + 1]

    def _reset_slots(self, rows: torch.Tensor | None, mask: torch.Tensor | None = None) -> None:
        """Start new episodes in ``rows`` (all slots when None), or in the slots where ``mask`` is True (computed for
        every slot, kept where the mask says: no host sync): draw images, take the glance."""
        count = self.num_envs if rows is None else rows.numel()
        if self.cache is not None:
            idx = self._draw(count)
            labels = self.cache.take("labels", idx)
            feats, fmap = self.cache.take("glance_features", idx), self.cache.take("glance_maps", idx)
            values = {}
        else:
            if self.num_envs == 1 and rows is None and mask is None and not self.reward_fn.needs_random:
                idx, images, labels = self._next_single_image()
            else:
                idx = self._draw(count)
                images, labels = self._get_images(idx)
            g = glance(images, self.patch_size, self.model.config.glance_mode)
            feats, fmap = encode(self.model.glance_encoder, g)
            values = {"images": images}
        if self.cache is not None and labels.numel():
            _check_labels(labels, self.num_classes)
        logits, memory = self.model.classifier.first(feats)  # = step(feats, init_state(count), 0)
        fmap = fmap.contiguous()  # (D, h, w) order in memory (not channels_last): observations flatten it as a view
        values.update({"index": idx, "labels": labels, "memory": memory, "probs": logits.float().softmax(1),
                       "glance_map": fmap, "last_features": feats})
        if self.observation_mode == "gfnet":  # the previous glimpse's map: GFNet's policy input, observed only there
            values["last_map"] = fmap
        values.update({"t": 1, "visited": False, "done": False, "cum_macs": float(self.glance_macs), "history": -1})
        # A reset rebinds the state to new tensors instead of writing into them, so the observations and infos can be
        # state tensors themselves (no copies): nothing the env returned changes later (a step writes in place only
        # into visited and history, which are never returned). The one exception is the image batch (never returned)
        # on a partial reset by rows: written in place, after a copy of the source's batch (a full reset keeps that
        # batch itself: ImageSource.get returns a new tensor).
        if rows is None and mask is None:  # every slot: the new tensors themselves, constants as new tensors
            for name, v in values.items():
                target = getattr(self, name)
                if isinstance(v, torch.Tensor):
                    setattr(self, name, v if v.dtype == target.dtype and v.device == target.device
                            else v.to(target.device, target.dtype))
                else:
                    setattr(self, name, torch.full_like(target, v))
            self._own_images = False
            self._cell_features = None
            return
        for name, v in values.items():  # tensors (one row per reset slot) and constants
            target = getattr(self, name)
            if isinstance(v, torch.Tensor):
                v = v.to(target.device, target.dtype)
            if mask is not None:
                new = torch.where(mask.view(-1, *[1] * (target.dim() - 1)), v, target)
            elif rows is not None and name == "images":
                if not self._own_images:
                    self.images, self._own_images = self.images.clone(), True
                self.images[rows] = v
                continue
            elif rows is not None:
                new = target.index_put((rows,), torch.as_tensor(v, dtype=target.dtype, device=target.device))
            elif isinstance(v, torch.Tensor):
                new = v
            else:
                new = torch.full_like(target, v)
            setattr(self, name, new)
            if name == "images":
                self._own_images = mask is not None  # torch.where made a new batch; a full reset keeps the source's
        self._cell_features = None

    def _observation(self) -> Any:
        n = self.num_envs
        if self.observation_mode == "gfnet":
            return self.last_map.reshape(n, -1).float()
        # state tensors themselves, not copies (see _reset_slots), but for the memory, which the next step reads
        obs = {"glance": self.glance_map.reshape(n, -1).float(), "focus": self.last_features.float(),
               "memory": self.memory.float().clone(), "visited": self.visited.float(),
               "step": (self.t.float() / self.steps)[:, None]}
        if self.observation_mode == "flat":
            return torch.cat(list(obs.values()), dim=1)
        return obs

    def _info(self) -> dict[str, Any]:
        conf, pred = self.probs.max(1)
        ones = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        info = {"prediction": pred, "confidence": conf, "correct": pred == self.labels, "macs": self.cum_macs,
                "glimpses": self.t, "true_confidence": self.probs.gather(1, self.labels[:, None]).squeeze(1)}
        if self.action_mode != "continuous":
            info["action_mask"] = self._action_mask()
        info.update({f"_{k}": ones for k in list(info)})
        return info

    def _check_actions(self, actions: Any) -> Any:
        """``actions`` as they are (a tensor) or as a numpy array, refused unless their shape is exactly the batched
        action space's, (N, 2) for continuous actions and (N,) for the grid modes (nothing is reshaped: a transposed
        batch is an error), and their dtype holds numbers of the right kind (floats or integers for locations,
        integers or whole floats for cells; never bools, complex numbers, strings or objects)."""
        n, continuous = self.num_envs, self.action_mode == "continuous"
        expected = (n, 2) if continuous else (n,)
        one_hot = () if continuous else (n, self.single_action_space.n)  # TorchRL's OneHot rows
        what = (f"one (y, x) location in [-1, 1] per slot, for {n} slot(s)" if continuous
                else f"one cell index in 0..{self.single_action_space.n - 1} per slot, for {n} slot(s)")
        if isinstance(actions, torch.Tensor):
            shape, dtype = tuple(actions.shape), actions.dtype
            kind = ("b" if dtype == torch.bool else "c" if dtype.is_complex else "f" if dtype.is_floating_point
                    else "i")
        else:
            try:
                actions = np.asarray(actions)
            except (ValueError, TypeError) as err:  # ragged nested lists
                raise ValueError(f"actions cannot be read as an array of shape {expected} ({what}): {err}") from None
            shape, dtype, kind = actions.shape, actions.dtype, actions.dtype.kind
        if shape == one_hot and kind in "biuf":
            return actions
        if shape != expected:
            swapped = " (the transposed shape: actions are never reshaped)" if shape == expected[::-1] else ""
            raise ValueError(f"actions of shape {shape}{swapped}: the action space {self.action_space} expects shape "
                             f"{expected}, {what}.")
        if kind not in "iuf":
            got = "bools" if kind == "b" else "complex numbers" if kind == "c" else dtype
            raise InvalidType(f"actions of dtype {dtype}: expected {'numbers' if continuous else 'integers'} "
                              f"({what}), not {got}.")
        return actions

    def _action_mask(self) -> torch.Tensor:
        """(N, A) bool on the device: the grid cells not yet visited (and the stop action)."""
        masks = ~self.visited
        if self.action_mode == "grid+stop":
            masks = torch.cat([masks, torch.ones(self.num_envs, 1, dtype=torch.bool, device=self.device)], 1)
        return masks

    def _actions_to_corners(self, actions: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Validate actions; return (corners (N, 2), cell index (N,), stop mask (N,) or None)."""
        n, actions = self.num_envs, self._check_actions(actions)
        if self.action_mode == "continuous":
            message = "Action contains NaN or inf; a continuous action is a location in [-1, 1]^2."
            if isinstance(actions, torch.Tensor):
                a = actions.to(device=self.device, dtype=torch.float32)
                check_finite(a, message)
            else:  # checked on the host, before the copy: a few numpy calls instead of three tensor ops
                arr = np.asarray(actions, dtype=np.float32)
                if not np.isfinite(arr).all():
                    raise ValueError(message)
                a = torch.from_numpy(arr).to(self.device)
            loc = (a.clamp(-1.0, 1.0) + 1.0) / 2.0  # (N, 2) in GFNet's [0, 1]^2, order (y, x)
            # = location_to_corner(loc, H, W, P) (loc is in [0, 1] already), both coordinates in one set of ops
            corners = (loc * self._corner_scale).floor_().long()
            ij = (corners.float() / self._span_t * (self.grid - 1)).round_().long()  # the nearest grid cell (i, j)
            return corners, (ij * self._cell_strides).sum(1), None
        n_actions = self.single_action_space.n
        if tuple(getattr(actions, "shape", ())) == (n, n_actions) and n_actions > 1:  # one-hot rows (TorchRL's OneHot)
            actions = _one_hot_to_index(actions, self.device)
        a = _as_tensor(actions, torch.long, self.device).reshape(n)
        if a.device.type == "cpu":
            if bool(((a < 0) | (a >= n_actions)).any()):
                bad = a[(a < 0) | (a >= n_actions)][0].item()
                raise ValueError(f"Grid action {bad} is out of range: valid actions are 0..{n_actions - 1} "
                                 f"({self.grid}x{self.grid} cells" + (" + stop)." if n_actions > self.grid ** 2
                                                                     else ")."))
        else:
            torch._assert_async(((a >= 0) & (a < n_actions)).all(), f"Grid action out of range 0..{n_actions - 1}")
        stop = (a == self.stop_action) if self.stop_action is not None else None
        cell = a.clamp(max=self.grid * self.grid - 1)
        return self.corners[cell], cell, stop

    def _focus(self, corners: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The focus encoder's pooled features (N, D) and spatial map (N, D, h, w) of the chosen patches: live, or
        gathered from the feature cache (the map only where it is cached, i.e. for observation="gfnet")."""
        if self.cache is None:
            return encode(self.model.focus_encoder, crop(self.images, corners, self.patch_size))
        fmap = self.cache.take("cell_maps", self.index, cell) if "cell_maps" in self.cache.tensors else None
        return self.cache.take("cell_features", self.index, cell), fmap

    # ------------------------------------------------------------------------------------------------ the API
    @_state_safe
    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        """Start new episodes in every slot, or (``options={"reset_mask": mask}``, Gymnasium's convention for
        ``AutoresetMode.DISABLED``) in the slots where the (N,) bool mask is True; the others go on as they were.
        Episodes in lockstep (every action mode but ``grid+stop``) restart together: a mask that is not all True
        is refused for them unless every slot's episode has ended."""
        if seed is not None:
            s = seed[0] if isinstance(seed, (list, tuple)) else seed
            self._gen.manual_seed(int(s))
            self._cursor = 0
            self._ahead = None
        mask = (options or {}).get("reset_mask")
        if mask is not None and self._t_host > 0:
            mask = _as_tensor(mask, torch.bool, self.device).reshape(self.num_envs)
            if not self.lockstep:
                self._reset_where(mask)
                return self._observation(), self._info()
            if self.device.type == "cpu" and not bool(mask.all()) and self._t_host < self.steps:
                raise ValueError(f"reset_mask resets some slots only, but with action={self.action_mode!r} the "
                                 "episodes run in lockstep (they start and end together): reset every slot, or use "
                                 "action='grid+stop'.")
        self._reset_slots(None)
        self._t_host = 1
        return self._observation(), self._info()

    @_state_safe
    def step(self, actions: Any):
        if self._t_host == 0:
            raise gym.error.ResetNeeded("Call reset() before step().")
        n, dev = self.num_envs, self.device
        if self.autoreset_mode == AutoresetMode.DISABLED and self.lockstep and self._t_host >= self.steps:
            raise gym.error.ResetNeeded("The episodes have ended (autoreset disabled); call reset().")
        if self.autoreset_mode == AutoresetMode.NEXT_STEP and self.lockstep and self._t_host >= self.steps:
            self._reset_slots(None)
            self._t_host = 1
            zeros = torch.zeros(n, dtype=torch.bool, device=dev)
            return self._observation(), torch.zeros(n, device=dev), zeros, zeros.clone(), self._info()
        idle = None
        if not self.lockstep:
            idle = self.done.clone()  # finished slots: reset now (NEXT_STEP) or left as they are; they do not move
            if self.autoreset_mode == AutoresetMode.NEXT_STEP:
                self._reset_where(idle)
        corners, cell, stop = self._actions_to_corners(actions)
        feats, fmap = self._focus(corners, cell)
        if self.lockstep:
            logits, memory = self.model.classifier.step(feats, self.memory, self._t_host)
        else:
            logits, memory = self._per_slot_classify(feats)
        probs = logits.float().softmax(1)
        # the slots that take their patch; None when all do (lockstep, no stop action): then nothing is masked
        moving = None if stop is None else ~stop if idle is None else ~stop & ~idle
        if idle is not None:
            stop = stop & ~idle

        def kept(new: torch.Tensor, old: torch.Tensor | float) -> torch.Tensor:
            """``new`` where the slot moved, ``old`` where it did not."""
            return new if moving is None else torch.where(moving.view(-1, *[1] * (new.dim() - 1)), new, old)

        # (when every slot moves, constants and in-place updates stand in for the masked ops: fewer ops per step)
        step_macs = self._focus_macs if moving is None else kept(self._focus_macs, 0.0)
        new_t = self.t + (1 if moving is None else moving.long())
        done = new_t >= self.steps
        if stop is not None:
            done = done | stop
        if not self.lockstep:
            done = done | self.done
        probs_after = kept(probs, self.probs)
        probs_random = self._random_glimpse_probs() if self.reward_fn.needs_random else None
        reward = self.reward_fn(self.probs, probs_after, self.labels, self.t if moving is None else new_t - 1,
                                step_macs, done, probs_random)
        reward = kept(reward, 0.0)
        self.memory, self.last_features = kept(memory, self.memory), kept(feats, self.last_features)
        if self.observation_mode == "gfnet":
            self.last_map = kept(fmap, self.last_map)
        if moving is None and self.lockstep:  # every slot at glimpse _t_host
            self.visited.scatter_(1, cell[:, None], True)
            self.history[:, self._t_host - 1] = corners
            self.cum_macs = self.cum_macs + float(self.focus_macs)
        else:
            rows = self._rows
            slot = (self.t - 1).clamp(0, self.steps - 2)
            self.visited[rows, cell] = True if moving is None else self.visited[rows, cell] | moving
            self.history[rows, slot] = corners if moving is None else kept(corners, self.history[rows, slot])
            self.cum_macs = self.cum_macs + step_macs.double()
        self.probs = probs_after
        self.t = new_t
        self.done = done
        self._t_host += 1
        terminated, truncated = done.clone(), torch.zeros(n, dtype=torch.bool, device=dev)
        obs, info = self._observation(), self._info()
        if self.autoreset_mode == AutoresetMode.SAME_STEP:
            any_done = (self._t_host >= self.steps) if self.lockstep else (self._masked_resets or bool(done.any()))
            if any_done:
                info["final_obs"] = obs
                info["final_info"] = info.copy()
                ended = done.clone()  # its own tensor: writing into it must not change terminated or the state
                info["_final_obs"] = ended
                info["_final_info"] = ended
                if self.lockstep:
                    self._reset_slots(None)
                    self._t_host = 1
                else:
                    self._reset_where(done)
                obs = self._observation()
                info.update(self._info())
        return obs, reward, terminated, truncated, info

    def _reset_where(self, mask: torch.Tensor) -> None:
        """Reset the slots where ``mask`` is True: by masks on CUDA (no sync), by their row indices elsewhere."""
        if self._masked_resets:
            self._reset_slots(None, mask=mask)
            return
        rows = mask.nonzero().squeeze(1)
        if rows.numel():
            self._reset_slots(rows)

    def _per_slot_classify(self, feats: torch.Tensor):
        """Classifier step with a per-slot step index (episodes out of lockstep, e.g. after early stops)."""
        if self.model.config.classifier == "gru":
            logits, memory = self.model.classifier.step(feats, self.memory, 1)
        else:
            logits = torch.zeros(self.num_envs, self.num_classes, device=self.device)
            memory = self.memory.clone()
            for t in range(1, self.steps):
                rows = self.t == t
                lg, mem = self.model.classifier.step(feats, self.memory, t)
                logits = torch.where(rows[:, None], lg, logits)
                memory = torch.where(rows[:, None], mem, memory)
        return logits, memory

    def _random_glimpse_probs(self) -> torch.Tensor:
        loc = torch.rand(self.num_envs, 2, generator=self._gen, device=self.device)
        corners = location_to_corner(loc, self.height, self.width, self.patch_size)
        feats, _ = encode(self.model.focus_encoder, crop(self.images, corners, self.patch_size))
        return self.model.classifier.step(feats, self.memory, 1)[0].float().softmax(1)

    def action_masks(self) -> np.ndarray:
        """(N, A) bool: the grid cells not yet visited (and the stop action), for MaskablePPO; the same as
        ``info["action_mask"]`` (a tensor on the device)."""
        if self.action_mode == "continuous":
            raise AttributeError("action_masks() exists for the grid action modes; use action='grid'.")
        return self._action_mask().cpu().numpy()

    @_state_safe
    def cell_confidences(self) -> torch.Tensor:
        """(N, G*G): the true-class probability the classifier would have after a focus patch on each grid cell.

        Privileged information (it uses the labels): the ``oracle`` baseline's upper reference.
        """
        n, cells = self.num_envs, self.grid * self.grid
        if self.cache is not None:
            self._cell_features = self.cache.take("cell_features", self.index)
        elif self._cell_features is None or self._cell_features.shape[0] != n:
            rep = self.images.repeat_interleave(cells, 0)
            feats, _ = encode(self.model.focus_encoder, crop(rep, self.corners.repeat(n, 1), self.patch_size))
            self._cell_features = feats.reshape(n, cells, -1)  # (N, G*G, D)
        memory = self.memory.repeat_interleave(cells, 0)
        t = self._t_host if self.lockstep else 1
        logits, _ = self.model.classifier.step(self._cell_features.reshape(n * cells, -1), memory, t)
        probs = logits.float().softmax(1).reshape(n, cells, -1)
        return probs.gather(2, self.labels[:, None, None].expand(n, cells, 1)).squeeze(2)

    def render(self) -> tuple[np.ndarray, ...] | None:
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode; make the env with render_mode='rgb_array'.")
            return None
        return tuple(self.render_slot(i) for i in range(self.num_envs))

    def render_slot(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8: slot i's image with its focus patches drawn as boxes numbered in order."""
        from torchvision.utils import draw_bounding_boxes

        image = self.images[i] if self.cache is None else self.source.get(self.index[i:i + 1])[0][0]
        img = image.detach().float().cpu().clamp(0, 1)
        img = (img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]).mul(255).to(torch.uint8)
        hist = self.history[i].cpu()
        hist = hist[hist[:, 0] >= 0]
        if len(hist):
            p = self.patch_size
            boxes = torch.stack([hist[:, 1], hist[:, 0], hist[:, 1] + p - 1, hist[:, 0] + p - 1], 1)
            colours = ["#ff3030", "#30c030", "#3080ff", "#ffb000", "#c040ff", "#00c0c0", "#ff60a0", "#a0a0a0"]
            img = draw_bounding_boxes(img, boxes, labels=[str(k + 1) for k in range(len(hist))],
                                      colors=[colours[k % len(colours)] for k in range(len(hist))], width=1)
        return img.permute(1, 2, 0).numpy()


def _official_model(task, split: str, device: torch.device, source) -> tuple[Any, Any]:
    """The model of a GFNet-Pytorch ``.pth.tar`` and the ImageNet images standardised for it (unless given)."""
    from gfenv.official import NormalizedSource, load_gfnet_checkpoint

    ckpt = load_gfnet_checkpoint(task.checkpoint, arch=task.model_words.get("backbone"), map_location=device,
                                 patch_size=task.model_words.get("patch_size"))
    if source is None:
        if task.data_root is None:
            raise FileNotFoundError(f"{task.checkpoint} reads ImageNet: pass data_root=<ImageNet folder>.")
        source = ckpt.source(task.data_root, split, device)
    elif not isinstance(source, NormalizedSource):
        source = NormalizedSource(source)
    return ckpt.model, source


def _as_tensor(x: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    arr = np.asarray(x)
    if dtype == torch.long and arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ValueError("Action contains NaN or inf; a grid action is an integer cell index.")
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"Grid actions must be integers, got {arr.ravel()[:4]}.")
    return torch.as_tensor(arr, device=device).to(dtype)


def _one_hot_to_index(actions: Any, device: torch.device) -> torch.Tensor:
    """(N, A) one-hot rows (bool or integers, as TorchRL's ``OneHot`` spec gives them) -> (N,) indices; rows that are
    not one-hot are refused (checked without a sync on CUDA)."""
    a = actions.to(device) if isinstance(actions, torch.Tensor) else torch.as_tensor(np.asarray(actions), device=device)
    if a.dtype.is_floating_point:
        raise ValueError("Grid actions given as (N, A) must be one-hot rows (bool or integers), not floats.")
    ok = ((a == 0) | (a == 1)).all() & (a.sum(1) == 1).all()
    if a.device.type == "cpu":
        if not bool(ok):
            raise ValueError("Grid actions given as (N, A) must be one-hot rows: one 1 per row, zeros elsewhere.")
    else:
        torch._assert_async(ok, "Grid actions given as (N, A) must be one-hot rows.")
    return a.argmax(1)


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.device.type == "cpu":
        bad = (labels < 0) | (labels >= num_classes)
        if bool(bad.any()):
            raise ValueError(f"Label {labels[bad][0].item()} is outside [0, {num_classes}): the data has more classes "
                             f"than the model ({num_classes}). Train a stage-1 checkpoint with the data's class count.")
    else:
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(),
                            f"A label is outside [0, {num_classes}): the data and the model disagree on classes.")


@contextlib.contextmanager
def _intra_op_threads(n: int | None):
    """Run the block with ``n`` intra-op threads (None: torch's setting), then restore torch's setting."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class GlanceFocusEnv(gym.Env):
    """The single-env view of ``GlanceFocusVectorEnv`` (a batch of one, numpy observations); see its docstring.

    ``threads`` (default 1): the intra-op threads its ``reset`` and ``step`` run with on a CPU, torch's setting
    restored after each call. A batch of one gains nothing from splitting its small convolutions across threads, and
    the threads' hand-offs cost more than the work (several times more on a machine busy with other processes);
    None keeps torch's setting.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 2}

    def __init__(self, render_mode: str | None = None, threads: int | None = 1, **kwargs):
        kwargs.pop("num_envs", None)
        cpu = torch.device(kwargs.get("device") or "cpu").type == "cpu"
        self.threads = threads if cpu else None
        with _intra_op_threads(self.threads):
            self.vec = GlanceFocusVectorEnv(num_envs=1, render_mode=render_mode,
                                            autoreset_mode=AutoresetMode.NEXT_STEP, **kwargs)
        self.render_mode = render_mode
        self.observation_space = self.vec.single_observation_space
        self.action_space = self.vec.single_action_space
        self._ended = True

    def _np(self, obs: Any) -> Any:
        """Numpy copies: Gymnasium's contract is new observation data on every call (the vector env's glance map is
        one tensor for a whole episode)."""
        if isinstance(obs, dict):
            return {k: v.cpu().numpy()[0].copy() for k, v in obs.items()}
        return obs.cpu().numpy()[0].copy()

    @staticmethod
    def _info(info: dict) -> dict:
        """Slot 0's entries: numbers, and numpy arrays for per-slot vectors (``action_mask``)."""
        return {k: (v.tolist()[0] if v.dim() == 1 else v.cpu().numpy()[0]) for k, v in info.items()
                if not k.startswith("_") and isinstance(v, torch.Tensor)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is None and not hasattr(self, "_seeded"):
            seed = int(self.np_random.integers(2**31))
        self._seeded = True
        with _intra_op_threads(self.threads):
            obs, info = self.vec.reset(seed=seed, options=options)
            self._ended = False
            return self._np(obs), self._info(info)

    def step(self, action: Any):
        if self._ended:
            raise gym.error.ResetNeeded("The episode has ended; call reset() before step().")
        expected = self.action_space.shape
        try:
            shape = tuple(action.shape) if isinstance(action, torch.Tensor) else np.shape(action)
        except ValueError:  # a ragged list
            shape = "ragged"
        if shape != expected:
            raise ValueError(f"action of shape {shape}: the action space {self.action_space} expects shape "
                             f"{expected}" + (", one (y, x) location in [-1, 1]." if expected else ", one cell index."))
        a = np.asarray(action)[None] if not isinstance(action, torch.Tensor) else action[None]
        with _intra_op_threads(self.threads):
            obs, reward, terminated, truncated, info = self.vec.step(a)
            (r,), (term,), (trunc,) = reward.tolist(), terminated.tolist(), truncated.tolist()
            self._ended = term or trunc
            return self._np(obs), r, term, trunc, self._info(info)

    def action_masks(self) -> np.ndarray:
        return self.vec.action_masks()[0]

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode; make the env with render_mode='rgb_array'.")
            return None
        return self.vec.render_slot(0)
