#!/usr/bin/env python3
"""The CLIP models in PyTorch on a GPU: the baseline bench/gpu_check.sh compares the CUDA back end with.

torch.nn with F.scaled_dot_product_attention (the fused flash / memory-efficient kernels), random
weights (throughput does not depend on their values), batch 256 by default:

- inference: bf16 weights and activations (model.bfloat16()), images/s or captions/s;
- training: one whole step (both towers forward and backward, CLIP's symmetric cross-entropy,
  torch.optim.AdamW, fused on CUDA) under torch.autocast(bf16) with fp32 master weights, as the
  CUDA back end keeps them; samples (image-text pairs)/s.

Each mode is `eager` or `compile` (torch.compile, default mode). Every measurement is printed at
once as one JSON line, so a run cut short by a timeout still reports what it measured:

    {"source": "pytorch", "mode": "eager", "case": "ViT-B-16_image", "batch": 256, "ms_per_iter": ...,
     "items_per_s": ..., "gflop_per_item": ..., "tflops": ...}

FLOPs are the matrix products only (2 per multiply-add), the same formulas as
clip::dims<Cfg>::{vision,text}::forward_flops(); a training step counts 3x the forward of both
towers. A failed case prints {"case": ..., "error": ...} and the script goes on.

    python3 bench/pytorch_gpu.py                                   # all cases, eager
    python3 bench/pytorch_gpu.py --modes compile --kinds train     # training under torch.compile
    python3 bench/pytorch_gpu.py --device cpu --batch 2 --iters 1 --models ViT-B-32   # a smoke test
"""
import argparse
import contextlib
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from torch_clip_models import AttentionPoolBase, ModifiedResNet, VisionTransformer, mlp, symmetric_cross_entropy

HAVE_SDPA = hasattr(F, "scaled_dot_product_attention")  # torch >= 2.0
HAVE_COMPILE = hasattr(torch, "compile")

# The variants' hyperparameters (include/clip/config/variants.hpp).
VARIANTS = {
    "ViT-B-32": dict(resolution=224, patch=32, width=768, layers=12, embed=512, text_width=512, text_layers=12),
    "ViT-B-16": dict(resolution=224, patch=16, width=768, layers=12, embed=512, text_width=512, text_layers=12),
    "ViT-L-14": dict(resolution=224, patch=14, width=1024, layers=24, embed=768, text_width=768, text_layers=12),
    "RN50": dict(resolution=224, stages=[3, 4, 6, 3], width=64, embed=1024, text_width=512, text_layers=12),
}
CONTEXT, VOCAB = 77, 49408


# ---- FLOPs, as include/clip/config/dims.hpp counts them ---------------------------------------

def transformer_flops(tokens, width, layers):
    t, c = float(tokens), float(width)
    return layers * (24.0 * t * c * c + 4.0 * t * t * c)


def text_flops(v):
    return transformer_flops(CONTEXT, v["text_width"], v["text_layers"]) + 2.0 * v["text_width"] * v["embed"]


def vision_flops(v):
    if "patch" in v:
        grid = v["resolution"] // v["patch"]
        c = v["width"]
        return (2.0 * grid * grid * c * 3 * v["patch"] ** 2 + transformer_flops(grid * grid + 1, c, v["layers"])
                + 2.0 * c * v["embed"])
    width, r = v["width"], v["resolution"]
    h = width / 2
    side = r / 2
    macs = side * side * (h * 3 * 9 + h * h * 9 + width * h * 9)
    side = r / 4
    cin = width
    for s, depth in enumerate(v["stages"]):
        p = width << s
        for b in range(depth):
            out_side = side / 2 if (s > 0 and b == 0) else side
            macs += side * side * (cin * p + 9 * p * p) + out_side * out_side * 4 * p * p
            if b == 0:
                macs += out_side * out_side * cin * 4 * p
            cin = 4 * p
            side = out_side
    c, t = width * 32.0, (r // 32) ** 2 + 1.0
    macs += 2 * t * c * c + c * c + 2 * t * c + c * v["embed"]
    return 2 * macs


# ---- the models: attention here, the rest in bench/torch_clip_models.py -----------------------

def attention(q, k, v, causal):
    """q, k, v: [B, H, T, D]."""
    if HAVE_SDPA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    # torch < 2.0 (the CPU smoke test on old torch): the same math, materialised.
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        t_q, t_k = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters (packed in_proj, out_proj), scaled_dot_product_attention."""

    def __init__(self, width, heads, causal):
        super().__init__()
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.heads, self.causal = heads, causal

    def forward(self, x):
        b, t, c = x.shape
        qkv = self.in_proj(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class ResidualBlock(nn.Module):
    def __init__(self, width, heads, causal=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = mlp(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class AttentionPool(AttentionPoolBase):
    def forward(self, x):
        x = self.tokens(x)
        b, t, c = x.shape

        def split(y):
            return y.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)

        out = attention(split(self.q(x[:, :1])), split(self.k(x)), split(self.v(x)), causal=False)
        return self.c_proj(out.transpose(1, 2).reshape(b, c))


class TextTransformer(nn.Module):
    def __init__(self, width, layers, embed):
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB, width)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, width) * 0.01)
        self.blocks = nn.Sequential(*[ResidualBlock(width, width // 64, causal=True) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed) * width**-0.5)

    def forward(self, text):
        x = self.token_embedding(text)
        x = self.blocks(x + self.positional_embedding.to(x.dtype))
        x = self.ln_final(x)
        eot = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        return eot @ self.text_projection.to(x.dtype)


def make_visual(v):
    if "patch" in v:
        return VisionTransformer(v["resolution"], v["patch"], v["width"], v["layers"], v["embed"], ResidualBlock)
    return ModifiedResNet(v["resolution"], v["stages"], v["width"], v["embed"], AttentionPool)


def make_text(v):
    return TextTransformer(v["text_width"], v["text_layers"], v["embed"])


class Clip(nn.Module):
    """Both towers, the learned temperature and CLIP's symmetric cross-entropy: forward is the loss."""

    def __init__(self, v):
        super().__init__()
        self.visual, self.text = make_visual(v), make_text(v)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images, texts):
        a = F.normalize(self.visual(images).float(), dim=-1)
        b = F.normalize(self.text(texts).float(), dim=-1)
        return symmetric_cross_entropy(a, b, self.logit_scale)


# ---- timing --------------------------------------------------------------------------------------

def full_captions(batch, device):
    """77 positions whose end-of-text token (the largest id) is the last: the full-length cost."""
    body = torch.randint(1, VOCAB - 2, (batch, CONTEXT - 1), device=device)
    return torch.cat([body, torch.full((batch, 1), VOCAB - 1, device=device)], 1)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, iters):
    """(seconds of the first call, which includes torch.compile's compilation; mean seconds per call after warmup)."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return first, (time.perf_counter() - start) / iters


def on(device):
    """Creates the parameters on `device` (torch >= 2.0): ViT-L/14's initialisation takes seconds on the CPU."""
    return device if hasattr(torch.device, "__enter__") else contextlib.nullcontext()


def run_inference(name, tower, mode, args, device):
    with on(device):
        return inference_case(name, tower, mode, args, device)


def run_train(name, mode, args, device):
    with on(device):
        return train_case(name, mode, args, device)


def inference_case(name, tower, mode, args, device):
    v = VARIANTS[name]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    if tower == "image":
        model = make_visual(v)
        x = torch.randn(args.batch, 3, v["resolution"], v["resolution"], device=device, dtype=dtype)
        flops = vision_flops(v)
    else:
        model = make_text(v)
        x = full_captions(args.batch, device)
        flops = text_flops(v)
    model = model.to(device=device, dtype=dtype).eval()
    if tower == "image" and "stages" in v and device.type == "cuda":
        # cuDNN's fastest bf16 convolutions want NHWC: what a PyTorch user tuning for speed does.
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fn_model = torch.compile(model) if mode == "compile" else model

    def step():
        with torch.inference_mode():
            return fn_model(x)

    first, seconds = timed(step, device, args.warmup, args.iters)
    return flops, first, seconds, args.dtype


def train_case(name, mode, args, device):
    v = VARIANTS[name]
    torch.manual_seed(0)
    model = Clip(v).to(device).train()
    images = torch.randn(args.batch, 3, v["resolution"], v["resolution"], device=device)
    texts = full_captions(args.batch, device)
    if "stages" in v and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    extra = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, **extra)
    loss_fn = torch.compile(model) if mode == "compile" else model
    # torch 1.x's CPU autocast cannot run LayerNorm on bf16 (the CPU smoke test): fp32 there.
    use_autocast = args.dtype == "bf16" and (device.type == "cuda" or HAVE_COMPILE)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
            loss = loss_fn(images, texts)
        loss.backward()
        optimizer.step()

    first, seconds = timed(step, device, args.warmup, args.iters)
    return 3.0 * (vision_flops(v) + text_flops(v)), first, seconds, "bf16-autocast" if use_autocast else "fp32"


def run_peak(args, device):
    """torch.matmul's bf16 throughput on one large square product: a cross-check of the C++ peak."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    first, seconds = timed(lambda: a @ b, device, args.warmup, max(args.iters, 20 if device.type == "cuda" else 1))
    return 2.0 * n**3, first, seconds, n


def emit(record):
    print(json.dumps(record), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (the first compiles)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--models", default="ViT-B-32,ViT-B-16,ViT-L-14,RN50", help="image towers to time")
    parser.add_argument("--text-models", default=None,
                        help="variants whose text tower is timed (default: ViT-B-32,ViT-L-14 among --models; "
                             "ViT-B/32's text tower is RN50's too, up to the projection)")
    parser.add_argument("--train-models", default=None,
                        help="variants whose training step is timed (default: ViT-B-32,RN50 among --models)")
    parser.add_argument("--modes", default="eager", help="eager, compile, or both: eager,compile")
    parser.add_argument("--kinds", default="peak,image,text,train",
                        help="which of peak (torch.matmul bf16), image, text, train to run, in this order")
    parser.add_argument("--budget-s", type=float, default=0,
                        help="start no new case after this many seconds (0: no limit); the caller's timeout is the hard one")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            emit({"source": "pytorch", "error": "no CUDA device: torch.cuda.is_available() is False"})
            return 1
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    emit({"source": "pytorch", "info": {
        "torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cuda": torch.version.cuda, "sdpa": HAVE_SDPA, "compile": HAVE_COMPILE, "batch": args.batch,
        "dtype": args.dtype, "iters": args.iters}})

    known = set(VARIANTS)
    models = [m for m in args.models.split(",") if m]
    if args.text_models is None:
        args.text_models = ",".join(m for m in ("ViT-B-32", "ViT-L-14") if m in models)
    if args.train_models is None:
        args.train_models = ",".join(m for m in ("ViT-B-32", "RN50") if m in models)
    kinds = set(args.kinds.split(","))
    per_kind = {"image": models, "text": [m for m in args.text_models.split(",") if m],
                "train": [m for m in args.train_models.split(",") if m]}
    cases = []  # in the order --kinds names them, so a time budget cuts the last ones
    for mode in args.modes.split(","):
        for kind in args.kinds.split(","):
            cases += [(mode, m, kind) for m in per_kind.get(kind, [])]

    start, failures = time.perf_counter(), 0
    if "peak" in kinds:
        flops, first, seconds, n = run_peak(args, device)
        emit({"source": "pytorch", "mode": "eager", "case": "bf16_gemm_peak", "n": n, "ms_per_iter": 1e3 * seconds,
              "tflops": 1e-12 * flops / seconds})
    for mode, name, kind in cases:
        case = f"{name}_{kind}"
        record = {"source": "pytorch", "mode": mode, "case": case, "batch": args.batch, "dtype": args.dtype}
        if name not in known:
            emit({**record, "error": f"unknown model {name}: one of {', '.join(VARIANTS)}"})
            failures += 1
            continue
        if mode == "compile" and not HAVE_COMPILE:
            emit({**record, "skipped": f"torch.compile needs torch >= 2.0 (this is {torch.__version__})"})
            continue
        if mode not in ("eager", "compile"):
            emit({**record, "error": f"unknown mode {mode}: eager or compile"})
            failures += 1
            continue
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            emit({**record, "skipped": f"time budget of {args.budget_s:.0f} s spent"})
            continue
        try:
            if kind == "train":
                flops, first, seconds, dtype = run_train(name, mode, args, device)
            else:
                flops, first, seconds, dtype = run_inference(name, kind, mode, args, device)
        except Exception as e:  # an out-of-memory or compile failure ends this case, not the run
            emit({**record, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            failures += 1
        else:
            emit({**record, "dtype": dtype, "ms_per_iter": 1e3 * seconds, "items_per_s": args.batch / seconds,
                  "gflop_per_item": 1e-9 * flops, "tflops": 1e-12 * flops * args.batch / seconds,
                  "first_call_s": first})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if mode == "compile" and HAVE_COMPILE:
                torch._dynamo.reset()  # each case compiles its own graphs; forget the last one's
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
