"""The default SB3 features extractor for the env's Dict observation: a small conv over the glance's spatial map and
an MLP over the vectors (latest glimpse's features, classifier memory, visited cells, step fraction).
"""

from __future__ import annotations

import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

VECTOR_KEYS = ("focus", "memory", "visited", "step")
MAX_POOLED_SIDE = 8


class GlanceFocusExtractor(BaseFeaturesExtractor):
    """Features of a ``GlanceFocusVectorEnv`` Dict observation, for SB3's ``MultiInputPolicy``.

    ``glance`` (flattened (D, h, w) map) -> 1x1 conv to ``conv_channels`` -> 3x3 conv -> average-pooled to at most
    8 x 8 -> flattened; ``focus``, ``memory``, ``visited``, ``step`` concatenated -> linear -> ``vector_dim``; both
    concatenated -> linear -> ``features_dim``, ReLU after each layer. ``glance_map_shape`` is the env's
    ``glance_map_shape`` (the SB3 builders pass it).
    """

    def __init__(self, observation_space: spaces.Dict, glance_map_shape: tuple[int, int, int],
                 features_dim: int = 256, conv_channels: int = 64, vector_dim: int = 128):
        super().__init__(observation_space, features_dim)
        missing = [k for k in ("glance", *VECTOR_KEYS) if k not in observation_space.spaces]
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
            nn.AdaptiveAvgPool2d(pooled), nn.Flatten())
        vector_size = sum(observation_space[k].shape[0] for k in VECTOR_KEYS)
        self.vector_net = nn.Sequential(nn.Linear(vector_size, vector_dim), nn.ReLU())
        glance_size = conv_channels // 2 * pooled[0] * pooled[1]
        self.head = nn.Sequential(nn.Linear(glance_size + vector_dim, features_dim), nn.ReLU())

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        glance_map = observations["glance"].reshape(-1, *self.glance_map_shape)  # (B, D, h, w)
        vectors = torch.cat([observations[k] for k in VECTOR_KEYS], dim=1)  # (B, D + S + G*G + 1)
        return self.head(torch.cat([self.glance_net(glance_map), self.vector_net(vectors)], dim=1))
