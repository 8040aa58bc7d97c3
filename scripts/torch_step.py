"""The training step of experiments/gpu-bench.toml in PyTorch eager, for comparison.

CLIP ViT-B/32 (224 px, width 768, 12 layers, 12 heads) and its text transformer (context 77,
width 512, 12 layers, 8 heads, causal, pooled at the end-of-text token), embed 512, pre-LN
blocks with QuickGELU, symmetric InfoNCE with a learned logit scale, AdamW (lr 1e-5,
weight decay 0.1), batch 64 of random pixels and token ids already on the GPU (so this side
pays no data preparation; Recall's step includes building its batch).

  python scripts/torch_step.py [--steps 30] [--batch 64] [--modes f32,bf16]

Prints one JSON line per mode: milliseconds per step (median), images/s, peak memory
(torch.cuda.max_memory_allocated). bf16 is torch.autocast(bfloat16) with f32 master weights.
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), QuickGELU(), nn.Linear(4 * width, width))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Vision(nn.Module):
    def __init__(self, image=224, patch=32, width=768, layers=12, heads=12, embed=512):
        super().__init__()
        self.conv = nn.Conv2d(3, width, patch, patch, bias=False)
        self.cls = nn.Parameter(torch.randn(width) * width**-0.5)
        self.pos = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width) * width**-0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.proj = nn.Linear(width, embed, bias=False)

    def forward(self, x):
        x = self.conv(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1).to(x.dtype), x], 1) + self.pos.to(x.dtype)
        x = self.ln_pre(x)
        for b in self.blocks:
            x = b(x)
        return self.proj(self.ln_post(x[:, 0]))


class Text(nn.Module):
    def __init__(self, vocab=49408, context=77, width=512, layers=12, heads=8, embed=512):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.01)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed, bias=False)
        self.register_buffer("mask", torch.full((context, context), float("-inf")).triu(1))

    def forward(self, ids):
        x = self.tok(ids) + self.pos
        for b in self.blocks:
            x = b(x, self.mask)
        x = self.ln(x)
        return self.proj(x[torch.arange(x.shape[0]), ids.argmax(-1)])


def step_fn(vision, text, scale, opt, px, ids, mode):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16"):
        img = vision(px)
        txt = text(ids)
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    logits = scale.exp() * img @ txt.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--modes", default="f32,bf16")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    for mode in a.modes.split(","):
        torch.manual_seed(0)
        vision, text = Vision().to(dev), Text().to(dev)
        scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=dev))
        opt = torch.optim.AdamW(list(vision.parameters()) + list(text.parameters()) + [scale], lr=1e-5, weight_decay=0.1)
        px = torch.randn(a.batch, 3, 224, 224, device=dev)
        ids = torch.randint(1, 49406, (a.batch, 77), device=dev)
        ids[:, 20] = 49407
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(a.steps + 5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            step_fn(vision, text, scale, opt, px, ids, mode)
            torch.cuda.synchronize()
            if i >= 5:
                times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1000
        print(json.dumps({"framework": "pytorch-eager", "torch": torch.__version__, "mode": mode, "batch": a.batch,
                          "ms_per_step": ms, "images_per_second": a.batch / (ms / 1000),
                          "peak_memory_bytes": torch.cuda.max_memory_allocated()}))
        del vision, text, opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
