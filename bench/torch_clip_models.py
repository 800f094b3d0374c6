"""The torch.nn pieces of CLIP that bench/pytorch_gpu.py and bench/pytorch_side_by_side.py share.

Only what both scripts render the same way lives here. Attention stays in each script and is
passed in as a class (`block`, `pool`): the GPU script uses F.scaled_dot_product_attention, the CPU
one nn.MultiheadAttention, and the two are timed as they are, so neither may change the other's.
The .to(x.dtype) casts let bf16 models (the GPU script) run; on float32 they do nothing.
"""
import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def mlp(width):
    """The residual blocks' feed-forward: width -> 4 width -> width with QuickGELU."""
    return nn.Sequential(nn.Linear(width, 4 * width), QuickGELU(), nn.Linear(4 * width, width))


class VisionTransformer(nn.Module):
    """`block(width, heads)`: the residual attention block."""

    def __init__(self, resolution, patch, width, layers, embed, block):
        super().__init__()
        grid = resolution // patch
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.Sequential(*[block(width, width // 64) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed) * width**-0.5)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid*grid, C]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.blocks(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj.to(x.dtype)


class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()

        def conv_bn(i, o, k):
            return [nn.Conv2d(i, o, k, padding=k // 2, bias=False), nn.BatchNorm2d(o)]

        self.branch = nn.Sequential(
            *conv_bn(inplanes, planes, 1), nn.ReLU(), *conv_bn(planes, planes, 3), nn.ReLU(),
            nn.AvgPool2d(stride) if stride > 1 else nn.Identity(), *conv_bn(planes, 4 * planes, 1))
        self.downsample = None
        if stride > 1 or inplanes != 4 * planes:
            self.downsample = nn.Sequential(nn.AvgPool2d(stride), *conv_bn(inplanes, 4 * planes, 1))

    def forward(self, x):
        skip = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.branch(x) + skip)


class ModifiedResNet(nn.Module):
    """`pool(side, width, heads, embed)`: the attention pooling of the last feature map."""

    def __init__(self, resolution, stages, width, embed, pool):
        super().__init__()
        h = width // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, h, 3, 2, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, h, 3, 1, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.AvgPool2d(2))
        blocks, inplanes = [], width
        for stage, depth in enumerate(stages):
            planes = width << stage
            for i in range(depth):
                blocks.append(Bottleneck(inplanes, planes, 2 if stage > 0 and i == 0 else 1))
                inplanes = 4 * planes
        self.blocks = nn.Sequential(*blocks)
        self.attnpool = pool(resolution // 32, width * 32, width * 32 // 64, embed)

    def forward(self, x):
        return self.attnpool(self.blocks(self.stem(x)))


class AttentionPoolBase(nn.Module):
    """The attention pooling's parameters and input; a subclass's forward does the attention.

    The mean of the positions queries the positions and itself (one query token per image)."""

    def __init__(self, side, width, heads, embed):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(side * side + 1, width) / width**0.5)
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.c_proj = nn.Linear(width, embed)
        self.heads = heads

    def tokens(self, x):
        """[B, C, H, W] -> [B, 1 + HW, C]: the mean first, plus the positional embedding."""
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)


def symmetric_cross_entropy(a, b, logit_scale):
    """CLIP's loss on L2-normalised image features a [B, E] and text features b [B, E]."""
    logits = logit_scale.exp() * a @ b.t()
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
