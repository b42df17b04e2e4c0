"""A small CNN that classifies 8x8 digits; its penultimate features define Digits-FID.

Architecture (``DigitClassifier``): three 3x3 conv layers (16, 32, 32 channels, ReLU; max-pool
after the second and third: 8x8 -> 4x4 -> 2x2), a 128 -> 64 feature layer (ReLU) and a
64 -> 10 linear head. Inputs are (N, 1, 8, 8) in [-1, 1] (``graftfx.data.digits``), clamped to
that range first, since diffusion samples may overshoot it.

``graftfx.eval.classifier_train.train_classifier`` trains it on the fixed train split with light augmentation (random
rotation +-12 degrees, scale 0.9..1.1, shift of up to one pixel), seeded, on the CPU, and
measures accuracy on the held-out test split. Weights are stored as safetensors (with the
architecture in the file's metadata) and load only from safetensors.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from graftfx.errors import GraftError

from graftfx.io import atomic_path

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "digits"
DEFAULT_WEIGHTS = ASSET_DIR / "classifier.safetensors"
FORMAT = "graftfx-digits-classifier/1"
TRAIN_COMMAND = "graftfx eval train-classifier --out graftfx/assets/digits"


class DigitClassifier(nn.Module):
    """conv(1->c1) -> conv(c1->c2) -> pool -> conv(c2->c3) -> pool -> fc(4*c3 -> feature_dim) -> head."""

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 32), feature_dim: int = 64,
                 num_classes: int = 10, dropout: float = 0.1):
        super().__init__()
        c1, c2, c3 = channels
        self.channels, self.feature_dim, self.num_classes = tuple(channels), feature_dim, num_classes
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc = nn.Linear(c3 * 4, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of images (N, 1, 8, 8) in [-1, 1]."""
        x = x.clamp(-1.0, 1.0)
        x = F.relu(self.conv1(x))                      # (N, c1, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)     # (N, c2, 4, 4)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)     # (N, c3, 2, 2)
        return F.relu(self.fc(x.flatten(1)))           # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (N, num_classes)

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "channels": ",".join(map(str, self.channels)),
                "feature_dim": str(self.feature_dim), "num_classes": str(self.num_classes)}


def save_classifier(model: DigitClassifier, path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the weights as safetensors (architecture in the metadata), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**model.metadata(), **(extra_metadata or {})})
    return Path(path)


def load_classifier(path=None, device="cpu") -> DigitClassifier:
    """The classifier from a safetensors file (default: the committed one), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise GraftError(f"digit classifier {path} not found: train one with "
                         f"'graftfx eval train-classifier --out {path.parent}'")
    if path.suffix != ".safetensors":
        raise GraftError(f"digit classifier {path} is not a .safetensors file: classifiers load from safetensors only")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise GraftError(f"{path} is not a graftfx digit classifier (metadata format {meta.get('format')!r}, "
                         f"expected {FORMAT!r}); retrain with 'graftfx eval train-classifier'")
    channels = tuple(int(c) for c in meta["channels"].split(","))
    model = DigitClassifier(channels, int(meta["feature_dim"]), int(meta["num_classes"]))
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise GraftError(f"digit classifier {path} does not fit its own metadata ({str(e).splitlines()[0]}); "
                         "retrain it with 'graftfx eval train-classifier'") from None
    return model.to(device).eval()


@functools.lru_cache(maxsize=4)
def _cached(path: str, device: str) -> DigitClassifier:
    model = load_classifier(path, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def default_classifier(device="cpu") -> DigitClassifier:
    """The committed classifier, loaded once per device (frozen, eval mode)."""
    return _cached(str(DEFAULT_WEIGHTS), str(torch.device(device)))


def file_digest(path) -> str:
    """First 12 hex digits of the file's SHA-256 (recorded with every measurement)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
