"""The default SB3 features extractor for the env's Dict observation: a small conv over the glance's spatial map and
an MLP over the vectors (latest glimpse's features, classifier memory, visited cells, step fraction).
"""

from __future__ import annotations

import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

VECTOR_KEYS = ("focus", "memory", "visited", "step")
OPEN_LOOP_KEYS = ("visited", "step")
"""What an open-loop policy reads besides the glance: its own earlier cells and the step, never a patch's content."""
MAX_POOLED_SIDE = 8


class GlanceFocusExtractor(BaseFeaturesExtractor):
    """Features of a ``GlanceFocusVectorEnv`` Dict observation, for SB3's ``MultiInputPolicy``.

    ``glance`` (flattened (D, h, w) map) -> 1x1 conv to ``conv_channels`` -> 3x3 conv -> average-pooled to at most
    8 x 8 -> flattened; ``focus``, ``memory``, ``visited``, ``step`` concatenated -> linear -> ``vector_dim``; both
    concatenated -> linear -> ``features_dim``, ReLU after each layer. ``glance_map_shape`` is the env's
    ``glance_map_shape`` (the SB3 builders pass it). ``vector_keys`` picks the vectors read (default all):
    ``OPEN_LOOP_KEYS`` makes an open-loop policy, whose cells depend on the glance and its own earlier choices only.
    """

    def __init__(self, observation_space: spaces.Dict, glance_map_shape: tuple[int, int, int],
                 features_dim: int = 256, conv_channels: int = 64, vector_dim: int = 128,
                 vector_keys: tuple[str, ...] | list[str] = VECTOR_KEYS):
        super().__init__(observation_space, features_dim)
        self.vector_keys = tuple(vector_keys)
        unknown = sorted(set(self.vector_keys) - set(VECTOR_KEYS))
        if unknown or not self.vector_keys:
            raise ValueError(f"vector_keys={list(self.vector_keys)}: choose a non-empty subset of {list(VECTOR_KEYS)}.")
        missing = [k for k in ("glance", *self.vector_keys) if k not in observation_space.spaces]
        if missing:
            raise ValueError(f"GlanceFocusExtractor needs the env's Dict observation (observation='dict'); the "
                             f"observation space lacks {missing}.")
        d, h, w = (int(s) for s in glance_map_shape)
        if observation_space["glance"].shape[0] != d * h * w:
            raise ValueError(f"glance_map_shape {(d, h, w)} does not match the glance observation of size "
                             f"{observation_space['glance'].shape[0]}; pass the env's glance_map_shape.")
        self.glance_map_shape = (d, h, w)
        pooled = (min(h, MAX_POOLED_SIDE), min(w, MAX_POOLED_SIDE))
        self.glance_net = nn.Sequential(
            nn.Conv2d(d, conv_channels, 1), nn.ReLU(),
            nn.Conv2d(conv_channels, conv_channels // 2, 3, padding=1), nn.ReLU(),
            # a map already within 8 x 8 passes as it is (pooling it to its own size only costs time)
            nn.AdaptiveAvgPool2d(pooled) if pooled != (h, w) else nn.Identity(), nn.Flatten())
        vector_size = sum(observation_space[k].shape[0] for k in self.vector_keys)
        self.vector_net = nn.Sequential(nn.Linear(vector_size, vector_dim), nn.ReLU())
        glance_size = conv_channels // 2 * pooled[0] * pooled[1]
        self.head = nn.Sequential(nn.Linear(glance_size + vector_dim, features_dim), nn.ReLU())

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        glance_map = observations["glance"].reshape(-1, *self.glance_map_shape)  # (B, D, h, w)
        vectors = torch.cat([observations[k] for k in self.vector_keys], dim=1)  # (B, D + S + G*G + 1) by default
        return self.head(torch.cat([self.glance_net(glance_map), self.vector_net(vectors)], dim=1))
