#!/usr/bin/env python3
"""CPU encoding and training throughput of this library beside PyTorch, interleaved in one run.

The PyTorch models (below, and bench/torch_clip_models.py) are this project's own torch.nn
rendering of the same architectures (QuickGELU, pre-LayerNorm residual attention blocks, the
modified ResNet with attention pooling), in float32 with random weights: throughput does not
depend on the weight values.

Each round runs one C++ benchmark case, then the same case in PyTorch, so both see the same
machine load. A training case (`*_train`) is one whole step: both towers forward and backward,
the symmetric cross-entropy, and torch.optim.AdamW. Usage (from the build folder's parent):

    OPENBLAS_CORETYPE=SkylakeX OMP_WAIT_POLICY=PASSIVE \\
        /usr/bin/python3 bench/pytorch_side_by_side.py --bench build/bench/clip-bench-encode
    OPENBLAS_CORETYPE=SkylakeX OMP_WAIT_POLICY=PASSIVE \\
        /usr/bin/python3 bench/pytorch_side_by_side.py --bench build/bench/clip-bench-train \\
        --cases ViT-B-32_train/16,RN50_train/16

A case named `<case>_bf16` (ViT-B-32_image_bf16/32, ViT-B-32_train_bf16/16, ...) runs clip with
Precision::bf16 and PyTorch under torch.autocast("cpu", torch.bfloat16) (its products in bf16
through oneDNN, AMX where the CPU has it); each row ends with the 1-minute load average.

PyTorch's fp32 products need OpenBLAS (libopenblas0-pthread) with OPENBLAS_CORETYPE=SkylakeX on
these CPUs, which it otherwise misdetects (falling back to SSE3 kernels).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F
from torch import nn

from torch_clip_models import AttentionPoolBase, ModifiedResNet, VisionTransformer, mlp, symmetric_cross_entropy


class ResidualBlock(nn.Module):
    def __init__(self, width, heads, causal_tokens=0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = mlp(width)
        mask = None
        if causal_tokens:
            mask = torch.full((causal_tokens, causal_tokens), float("-inf")).triu(1)
        self.register_buffer("mask", mask)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.mask)[0]
        return x + self.mlp(self.ln_2(x))


class AttentionPool(AttentionPoolBase):
    def forward(self, x):
        x = self.tokens(x)
        b, t, c = x.shape
        split = lambda y: y.view(b, -1, self.heads, c // self.heads).transpose(1, 2)
        q, k, v = split(self.q(x[:, :1])), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5, dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(b, c))


class TextTransformer(nn.Module):
    def __init__(self, context, vocab, width, layers, embed):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.01)
        self.blocks = nn.Sequential(*[ResidualBlock(width, width // 64, context) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed) * width**-0.5)

    def forward(self, text):
        x = self.blocks(self.token_embedding(text) + self.positional_embedding)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


# name -> (model factory, input factory for a batch, GFLOP per item (matrix products, 2 per multiply-add))
CASES = {
    "ViT-B-32_image": (lambda: VisionTransformer(224, 32, 768, 12, 512, ResidualBlock),
                       lambda b: torch.randn(b, 3, 224, 224), 8.8176),
    "RN50_image": (lambda: ModifiedResNet(224, [3, 4, 6, 3], 64, 1024, AttentionPool),
                   lambda b: torch.randn(b, 3, 224, 224), 11.586),
    # Captions of 77 positions whose end-of-text token is the last one: the full-length cost.
    "ViT-B-32_text": (lambda: TextTransformer(77, 49408, 512, 12, 512),
                      lambda b: torch.cat([torch.randint(1, 49406, (b, 76)), torch.full((b, 1), 49407)], 1), 5.9595),
}


class Clip(nn.Module):
    """Both towers, the learned temperature and CLIP's symmetric cross-entropy."""

    def __init__(self, visual, text):
        super().__init__()
        self.visual, self.text = visual, text
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def loss(self, images, texts):
        a = F.normalize(self.visual(images), dim=-1)
        b = F.normalize(self.text(texts), dim=-1)
        return symmetric_cross_entropy(a, b, self.logit_scale)


def full_captions(b):
    return torch.cat([torch.randint(1, 49406, (b, 76)), torch.full((b, 1), 49407)], 1)


# name -> (model factory, GFLOP per image-text pair: 3x the forward of both towers)
TRAIN_CASES = {
    "ViT-B-32_train": (lambda: Clip(VisionTransformer(224, 32, 768, 12, 512, ResidualBlock),
                                    TextTransformer(77, 49408, 512, 12, 512)),
                       3 * (8.8176 + 5.9595)),
    "RN50_train": (lambda: Clip(ModifiedResNet(224, [3, 4, 6, 3], 64, 1024, AttentionPool),
                                TextTransformer(77, 49408, 512, 12, 1024)),
                   3 * (11.586 + 5.9600)),
}


def base_case(name):
    """(the fp32 case, whether bf16): `<case>_bf16` is <case> with its products in bf16."""
    return (name[:-len("_bf16")], True) if name.endswith("_bf16") else (name, False)


def time_torch_train(name, batch, seconds, bf16=False):
    model = TRAIN_CASES[name][0]().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    images, texts = torch.randn(batch, 3, 224, 224), full_captions(batch)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # open_clip's amp_bf16
            loss = model.loss(images, texts)
        loss.backward()
        optimizer.step()

    step()
    runs, start = 0, time.perf_counter()
    while True:
        step()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and runs >= 3:
            return batch * runs / elapsed


def time_torch(name, batch, seconds):
    name, bf16 = base_case(name)
    if name in TRAIN_CASES:
        return time_torch_train(name, batch, seconds, bf16)
    make_model, make_input, _ = CASES[name]
    model = make_model().eval()
    x = make_input(batch)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(2):
            model(x)
        runs, start = 0, time.perf_counter()
        while True:
            model(x)
            runs += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and runs >= 3:
                return batch * runs / elapsed


def time_cpp(binary, name, batch, seconds):
    out = subprocess.run(
        [binary, f"--benchmark_filter=^{name}/{batch}(/|$)", "--benchmark_format=json",
         f"--benchmark_min_time={seconds}"],
        check=True, capture_output=True, text=True).stdout
    bench = json.loads(out)["benchmarks"][0]
    return bench["items_per_second"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default="build/bench/clip-bench-encode", help="the C++ benchmark program")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case (median reported)")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing per measurement")
    parser.add_argument("--cases", default="ViT-B-32_image/1,ViT-B-32_image/8,RN50_image/1,RN50_image/8,ViT-B-32_text/32")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    print("| case | batch | clip items/s | clip GFLOP/s | PyTorch items/s | PyTorch GFLOP/s | ratio | load |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for case in args.cases.split(","):
        name, batch = case.split("/")
        batch = int(batch)
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(time_cpp(args.bench, name, batch, args.seconds))
            theirs.append(time_torch(name, batch, args.seconds))
        a, b = statistics.median(ours), statistics.median(theirs)
        base = base_case(name)[0]
        gflop = TRAIN_CASES[base][1] if base in TRAIN_CASES else CASES[base][2]
        print(f"| {name} | {batch} | {a:.2f} | {a * gflop:.0f} | {b:.2f} | {b * gflop:.0f} | {a / b:.2f}x "
              f"| {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
