"""Small attention and MLP variants in other models' styles (used by the match/splice tests)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

D, H = 32, 4


class ExplicitSoftmax(nn.Module):
    """Separate q/k/v projections, softmax(q @ k^T * scale) @ v, heads folded into the batch."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(D, D) for _ in range(4))
        self.scale = (D // H) ** -0.5

    def forward(self, x):
        B, N, C = x.shape

        def heads(t):
            return t.reshape(B, N, H, C // H).permute(0, 2, 1, 3).reshape(B * H, N, C // H)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))
        attn = (q @ k.transpose(-2, -1)) * self.scale
        o = attn.softmax(dim=-1) @ v                                  # (B*H, N, Dh)
        return self.to_out(o.reshape(B, H, N, C // H).permute(0, 2, 1, 3).reshape(B, N, C))


class InterleavedQKV(nn.Module):
    """A fused qkv whose rows are laid out (head, {q,k,v}, dim) rather than ({q,k,v}, head, dim)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, H, 3, C // H).permute(3, 0, 2, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.permute(0, 2, 1, 3).reshape(B, N, C))


class QKNorm(nn.Module):
    """Per-head LayerNorm on q and k (as diffusers' qk_norm='layer_norm')."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(D, D) for _ in range(4))
        self.norm_q, self.norm_k = nn.LayerNorm(D // H, eps=1e-5), nn.LayerNorm(D // H, eps=1e-5)
        nn.init.normal_(self.norm_q.weight, 1, 0.2)
        nn.init.normal_(self.norm_k.bias, 0, 0.2)

    def forward(self, x):
        B, N, C = x.shape
        q = self.norm_q(self.to_q(x).view(B, N, H, C // H).transpose(1, 2))
        k = self.norm_k(self.to_k(x).view(B, N, H, C // H).transpose(1, 2))
        v = self.to_v(x).view(B, N, H, C // H).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(o.transpose(1, 2).reshape(B, N, C))


class Cross(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_out = nn.Linear(D, D), nn.Linear(D, D)
        self.to_k, self.to_v = nn.Linear(24, D), nn.Linear(24, D)

    def forward(self, x, ctx):
        B, N, C = x.shape
        q = self.to_q(x).view(B, N, H, C // H).transpose(1, 2)
        k = self.to_k(ctx).view(B, -1, H, C // H).transpose(1, 2)
        v = self.to_v(ctx).view(B, -1, H, C // H).transpose(1, 2)
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Joint(nn.Module):
    """Attention over the concatenation of image tokens and (projected) text tokens."""

    def __init__(self):
        super().__init__()
        self.ctx_in = nn.Linear(24, D)
        self.attn = InterleavedQKV()

    def forward(self, x, ctx):
        joint = torch.cat([x, self.ctx_in(ctx)], dim=1)
        return self.attn(joint)[:, : x.shape[1]]


class GEGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(D, 2 * 3 * D), nn.Linear(3 * D, D)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(D, 48, bias=False), nn.Linear(D, 48, bias=False), nn.Linear(48, D, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, attn: type, mlp: type | None):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = attn()
        self.mlp = mlp() if mlp else None
        self.cross = attn in (Cross, Joint)

    def forward(self, x, ctx):
        x = x + (self.attn(self.norm(x), ctx) if self.cross else self.attn(self.norm(x)))
        return x + self.mlp(x) if self.mlp is not None else x


class Net(nn.Module):
    """``depth`` blocks of the given attention (and MLP) style over (B, 16, D) tokens."""

    def __init__(self, attn: type, mlp: type | None = None, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(attn, mlp) for _ in range(depth))

    def forward(self, x, ctx):
        for b in self.blocks:
            x = b(x, ctx)
        return x


def inputs(batch: int):
    return torch.randn(batch, 16, D), torch.randn(batch, 5, 24)
