"""Sample grids as PNG files (matplotlib's Agg backend, no display), written atomically.

``save_grid`` writes the images alone, pixel-exact: every image pixel becomes a
``scale x scale`` block, ``pad`` white pixels between and around images, so a grid of ``N``
images of ``H x W`` with ``nrow`` per row is
``nrow * (W * scale + pad) + pad`` pixels wide and ``rows * (H * scale + pad) + pad`` high.
``save_comparison`` stacks labelled rows (e.g. teacher / grafted before / grafted after, made
from the same noise and labels) with the labels drawn in a left margin.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from graftfx.errors import GraftError

from graftfx.io import atomic_path


def _to_array(images) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] with C = 1 or 3 -> (N, H, W, 3) float in [0, 1]."""
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise GraftError(f"images have shape {tuple(x.shape)}: grids need (N, 1 or 3, H, W) images in [-1, 1] "
                         "(decode latents first)")
    x = ((torch.nan_to_num(x, nan=-1.0).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    return x.numpy()


def tile(images, nrow: int, scale: int = 4, pad: int = 1, fill: float = 1.0) -> np.ndarray:
    """One (height, width, 3) array in [0, 1] holding the images in rows of ``nrow``."""
    if nrow < 1 or scale < 1 or pad < 0:
        raise GraftError(f"grid nrow={nrow}, scale={scale}, pad={pad}: need nrow >= 1, scale >= 1, pad >= 0")
    x = _to_array(images)
    n, h, w, _ = x.shape
    x = x.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, h*scale, w*scale, 3)
    rows, ch, cw = math.ceil(n / nrow), h * scale, w * scale
    out = np.full((rows * (ch + pad) + pad, nrow * (cw + pad) + pad, 3), fill, dtype=np.float64)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = pad + r * (ch + pad), pad + c * (cw + pad)
        out[top:top + ch, left:left + cw] = x[i]
    return out


def save_grid(images, path, nrow: int = 10, *, scale: int = 4, pad: int = 1) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as a PNG grid with ``nrow`` images per row."""
    from matplotlib.image import imsave

    array = tile(images, nrow, scale, pad)
    with atomic_path(path) as tmp:
        imsave(tmp, array, format="png")
    return Path(path)


def save_comparison(rows: dict, path, *, scale: int = 4, pad: int = 1, title: str | None = None,
                    columns: list[str] | None = None, label_width: int | None = None, dpi: int = 100) -> Path:
    """Write labelled rows of images as one PNG: ``{"teacher": x, "grafted": y, ...}``.

    Each value is (K, C, H, W) in [-1, 1] shown as one row of K images (all rows share H, W).
    ``columns`` labels the columns (e.g. the class of each), ``title`` goes on top. Pixel size:
    ``label_width + tile width`` by ``title band + column band + tile height`` (see module doc).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise GraftError("save_comparison got no rows: pass {label: images, ...}")
    arrays = {str(k): _to_array(v) for k, v in rows.items()}
    shapes = {a.shape[1:3] for a in arrays.values()}
    if len(shapes) != 1:
        raise GraftError(f"comparison rows have different image sizes {sorted(shapes)}: pass images of one size")
    k = max(a.shape[0] for a in arrays.values())
    strips = [tile(torch.from_numpy(a).permute(0, 3, 1, 2) * 2 - 1, k, scale, pad) for a in arrays.values()]
    strip_h, strip_w = strips[0].shape[0], strips[0].shape[1]
    strips = [np.pad(s, ((0, 0), (0, strip_w - s.shape[1]), (0, 0)), constant_values=1.0) for s in strips]
    body = np.concatenate(strips, axis=0)  # (rows * strip_h, strip_w, 3)
    font_px = 12
    left = label_width if label_width is not None else 16 + int(0.62 * font_px * max(len(k) for k in arrays))
    top_title = 2 * font_px if title else 0
    top_cols = int(1.6 * font_px) if columns else 0
    width, height = left + strip_w, top_title + top_cols + body.shape[0]
    fig = Figure(figsize=((width + 0.01) / dpi, (height + 0.01) / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    fig.figimage(body, xo=left, yo=0, origin="upper")
    points = font_px * 72 / dpi
    for i, label in enumerate(arrays):
        y = body.shape[0] - (i + 0.5) * strip_h
        fig.text((left - 8) / width, y / height, label, ha="right", va="center", fontsize=points)
    if columns:
        cw = next(iter(shapes))[1] * scale
        for j, name in enumerate(columns[:k]):
            x = left + pad + j * (cw + pad) + cw / 2  # centre of column j
            fig.text(x / width, (body.shape[0] + top_cols / 2) / height, str(name), ha="center", va="center",
                     fontsize=points * 0.9)
    if title:
        fig.text(0.5, (height - top_title / 2) / height, title, ha="center", va="center", fontsize=points * 1.1)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    return Path(path)
