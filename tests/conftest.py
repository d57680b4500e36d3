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




@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests use tiny batches: one intra-op thread is as fast, and far faster when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
