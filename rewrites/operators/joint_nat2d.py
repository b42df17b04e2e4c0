"""Joint neighbourhood attention for MMDiT joint attention (SD3, Flux): the image tokens attend
locally, the text tokens globally.

Over the joint sequence (text + image tokens, in the original's order):

- a text token attends to every token (text and image), as in the original;
- an image token at (i, j) of the (H, W) grid attends to every text token and to the
  kernel_size x kernel_size neighbourhood of image tokens around it (NATTEN's window, shifted
  inward at the borders; ``graftfx.kernels.nat2d``).

So the prompt still reaches every image token in every block, while image-image attention
costs O(L k^2) instead of O(L^2). The image part runs as two softmax pieces merged exactly by
their log-sum-exps: the 2D neighbourhood over image keys (``neighborhood_attention_2d(...,
return_lse=True)``, Triton on GPU) and dense attention over the S text keys; the text queries
run dense SDPA over all keys. ``dense_mask`` is the same attention as one boolean mask over the
joint sequence; ``reference`` computes through it (the tests compare the two).

q/k/v/out projections per stream as every attention-family operator (``graftfx.operator``),
copied from the original with ``init="copy"`` (the q/k norms of each stream included). With a
kernel covering the whole grid it is the original joint attention. It applies the region's
rotary embedding (Flux) before the core; it takes no mask or bias. The grid is the image
stream's (``Region.grid``; trace with ``grid=(H, W)`` when the model does not state it, as
Flux's packed latents do not).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graftfx.kernels.nat2d import nat2d_mask, neighborhood_attention_2d
from graftfx.match.grid import region_token_grid, token_grid
from graftfx.operator import AttentionConfig, AttentionOperator
from graftfx.options import check_int
from graftfx.registry import register_operator


@dataclass
class JointNAT2DConfig(AttentionConfig):
    kernel_size: int = 7           # odd; each image token sees kernel_size x kernel_size image tokens

    def __post_init__(self):
        super().__post_init__()
        check_int("kernel_size", self.kernel_size, 1, odd=True)


def _spans(segments):
    """(start, stop) of the image stream "x" and of the text stream(s), in sequence order."""
    image, text, start = None, [], 0
    for name, n in segments:
        if name == "x":
            image = (start, start + n)
        else:
            text.append((start, start + n))
        start += n
    if image is None:
        raise ValueError("joint_nat2d: the region names no image stream 'x' among its segments")
    return image, text


def dense_mask(segments, grid, kernel_size: int, device=None) -> torch.Tensor:
    """The attention pattern as one (L, L) boolean mask (True: attends) over the joint sequence."""
    total = sum(n for _, n in segments)
    (i0, i1), text = _spans(segments)
    mask = torch.ones(total, total, dtype=torch.bool, device=device)
    mask[i0:i1, i0:i1] = nat2d_mask(grid[0], grid[1], kernel_size, device=device)
    return mask


@register_operator("joint_nat2d", config=JointNAT2DConfig, kinds=("joint_attention",), loss="l1",
                   description="joint attention: image tokens see a k x k neighbourhood + all text; text sees all")
class JointNeighborhoodAttention2D(AttentionOperator):
    @classmethod
    def from_region(cls, region, config):
        segments = region.details.get("segments")
        if not segments or not any(name == "x" for name, _ in segments):
            raise ValueError("joint_nat2d needs a joint-attention region whose image stream is known "
                             "(details['segments']); match it with the joint_attention pattern")
        image = dict((name, n) for name, n in segments)["x"]
        grid = region.details.get("x_grid") or region.grid
        region_token_grid(region, who="joint_nat2d", tokens=image, grid=grid)   # fail at build time
        op = super().from_region(region, config)
        op.grid = tuple(grid) if grid is not None else None
        if not op.joint:                                     # one stream already joined (Flux single blocks)
            op.segments = tuple((name, n) for name, n in segments)
        return op

    segments = None       # a joined stream's fixed segments (two-stream regions pass them per call)

    def attend(self, q, k, v, extra, segments=None):
        return self.joint_kernel(q, k, v, segments or self.segments)

    def kernel(self, q, k, v):
        return self.joint_kernel(q, k, v, self.segments)

    def joint_kernel(self, q, k, v, segments):
        (i0, i1), text = _spans(segments)
        grid = token_grid(i1 - i0, self.grid, who="joint_nat2d")
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        out = torch.empty_like(q)
        qi, ki, vi = (t[:, :, i0:i1] for t in (q, k, v))
        local, lse_local = neighborhood_attention_2d(qi.contiguous(), ki.contiguous(), vi.contiguous(), grid,
                                                     self.config.kernel_size, scale=scale, return_lse=True)
        if text:
            kt = torch.cat([k[:, :, a:b] for a, b in text], dim=2)
            vt = torch.cat([v[:, :, a:b] for a, b in text], dim=2)
            s = (qi.float() @ kt.float().transpose(-1, -2)) * scale              # (B, H, L_img, S)
            lse_text = torch.logsumexp(s, dim=-1)
            glob = torch.softmax(s, dim=-1) @ vt.float()
            lse = torch.logaddexp(lse_local.float(), lse_text)
            image = local.float() * (lse_local.float() - lse).exp().unsqueeze(-1) \
                + glob * (lse_text - lse).exp().unsqueeze(-1)
            out[:, :, i0:i1] = image.to(q.dtype)
            for a, b in text:                                                   # text sees everything
                out[:, :, a:b] = F.scaled_dot_product_attention(q[:, :, a:b], k, v, scale=self.scale)
        else:
            out[:, :, i0:i1] = local
        return out

    def reference_attention(self, q, k, v, segments):
        """The same attention through one dense boolean mask (fp32)."""
        mask = dense_mask(segments, self.grid, self.config.kernel_size, device=q.device)
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale).to(q.dtype)

    def flops(self, tokens: int, context_tokens: int | None = None) -> int:
        s = context_tokens or 0
        ks = self.config.kernel_size
        h, w = self.grid if self.grid else (tokens, 1)
        local = tokens * min(ks, h) * min(ks, w)
        pairs = local + tokens * s + s * (tokens + s)
        return self.projection_flops(tokens, context_tokens) + 4 * pairs * self.width
