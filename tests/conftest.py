"""Shared fixtures: small envs on the shipped default task, and a tiny in-memory image source."""

from __future__ import annotations

import pytest
import torch

from gfenv.data import ImageSource


class TensorImages(ImageSource):
    """A handful of given images and labels, for tests of bad input."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        self.images, self.lab, self.num_classes = images, labels, num_classes
        self.image_shape = tuple(images.shape[1:])
        self.device = images.device

    def __len__(self) -> int:
        return len(self.images)

    def get(self, indices: torch.Tensor):
        return self.images[indices], self.lab[indices]


@pytest.fixture
def tensor_images():
    return TensorImages


