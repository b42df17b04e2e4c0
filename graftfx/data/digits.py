"""scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), offline, as diffusion data.

Pixels 0..16 map to [-1, 1]; shape (N, 1, 8, 8): the "latents" of the bundled DiT are the
pixels themselves (no VAE). The split is fixed by a seed so the classifier's held-out
accuracy and the FID reference set never change.
"""
from __future__ import annotations

import torch

# The bundled model's DiT config: 8x8 digits at patch 1 -> 64 tokens, 8 blocks.
DIGITS_CONFIG = dict(input_size=8, patch_size=1, in_channels=1, hidden_size=128, depth=8, num_heads=4,
                     mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True)


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 1, 8, 8) in [-1, 1] float32, labels (1797,) int64)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images).float().div(16.0).mul(2).sub(1).unsqueeze(1)
    y = torch.from_numpy(data.target).long()
    return x, y


def digits_split(test_fraction: float = 0.2, seed: int = 0):
    """Fixed train/test split: ((x_train, y_train), (x_test, y_test))."""
    x, y = digits_dataset()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])
