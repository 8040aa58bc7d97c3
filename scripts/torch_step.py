"""The training step of Recall's step benchmarks in PyTorch eager, for comparison.

Presets (the same model family, options and batch as the Recall config named):
  vitb32      experiments/gpu-bench.toml: CLIP ViT-B/32 (224 px, width 768, 12 layers, 12
              heads), text context 77 / width 512 / 12 layers / 8 heads, embed 512, full
              fine-tuning, AdamW lr 1e-5 wd 0.1, batch 64 (CUDA by default).
  cpu-c-clip  experiments/bench/cpu-c-clip.toml: 32 px images, patch 4, width 128, 4 layers,
              4 heads, text context 32, embed 128; LoRA r8 (alpha 16) on every linear layer
              of both towers with the adapted bases frozen; CKC (Linear-BN-ReLU-Linear
              projector, InfoNCE against the frozen old model's features); AdamW lr 1e-3 wd
              0.05, grad clipping at 1.0; batch 128 (CPU by default).
  cpu-lora    cpu-c-clip without CKC (experiments/bench/cpu-lora.toml).

Both towers: pre-LN blocks with QuickGELU, separate q/k/v/out projections with bias, the text
tower causal and pooled at the end-of-text token, symmetric InfoNCE with a learned logit scale.
By default the batch (random pixels and ids) is made once, on the device; --host-batch builds
it every step from uint8 images on the host (resized already, normalised with CLIP's mean and
std, then copied), as Recall's step does.

  python scripts/torch_step.py [--preset P] [--steps 20] [--warmup 3] [--modes f32,bf16]
                               [--device cpu|cuda] [--threads N] [--host-batch]

One JSON line per mode: median and p90 milliseconds per step, images/s, peak memory (CUDA:
torch.cuda.max_memory_allocated and the driver's used memory; CPU: the peak RSS).
"""

import argparse
import json
import math
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    "vitb32": dict(image=224, patch=32, vw=768, vl=12, vh=12, context=77, tw=512, tl=12, th=8, embed=512,
                   lora=0, ckc=False, lr=1e-5, wd=0.1, clip=None, batch=64, device="cuda", modes="f32,bf16"),
    "cpu-c-clip": dict(image=32, patch=4, vw=128, vl=4, vh=4, context=32, tw=128, tl=4, th=4, embed=128,
                       lora=8, ckc=True, lr=1e-3, wd=0.05, clip=1.0, batch=128, device="cpu", modes="f32"),
    "cpu-lora": dict(image=32, patch=4, vw=128, vl=4, vh=4, context=32, tw=128, tl=4, th=4, embed=128,
                     lora=8, ckc=False, lr=1e-3, wd=0.05, clip=1.0, batch=128, device="cpu", modes="f32"),
}
VOCAB, EOT = 49408, 49407


class Linear(nn.Module):
    """nn.Linear with an optional LoRA branch (A ~ kaiming-uniform, B = 0, scale alpha / r);
    with LoRA the base weight and bias are frozen, as Recall's `freeze_base = "adapted"`."""

    def __init__(self, i, o, bias=True, rank=0, alpha=16):
        super().__init__()
        self.base = nn.Linear(i, o, bias=bias)
        self.rank = rank
        if rank:
            self.base.requires_grad_(False)
            self.a = nn.Parameter(torch.empty(rank, i))
            nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
            self.b = nn.Parameter(torch.zeros(o, rank))
            self.scale = alpha / rank

    def forward(self, x):
        y = self.base(x)
        if self.rank:
            y = y + (x @ self.a.t() @ self.b.t()) * self.scale
        return y


class Block(nn.Module):
    def __init__(self, width, heads, rank):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.out = (Linear(width, width, rank=rank) for _ in range(4))
        self.fc1, self.fc2 = Linear(width, 4 * width, rank=rank), Linear(4 * width, width, rank=rank)

    def forward(self, x, causal):
        b, n, w = x.shape
        h = self.ln_1(x)
        split = lambda t: t.view(b, n, self.heads, w // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=causal)
        x = x + self.out(a.transpose(1, 2).reshape(b, n, w))
        h = self.fc1(self.ln_2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))


class Vision(nn.Module):
    def __init__(self, p, rank):
        super().__init__()
        w = p["vw"]
        self.conv = nn.Conv2d(3, w, p["patch"], p["patch"], bias=False)
        self.cls = nn.Parameter(torch.randn(w) * w**-0.5)
        self.pos = nn.Parameter(torch.randn((p["image"] // p["patch"]) ** 2 + 1, w) * w**-0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(w), nn.LayerNorm(w)
        self.blocks = nn.ModuleList([Block(w, p["vh"], rank) for _ in range(p["vl"])])
        self.proj = Linear(w, p["embed"], bias=False, rank=rank)

    def forward(self, x):
        x = self.conv(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1).to(x.dtype), x], 1) + self.pos.to(x.dtype)
        x = self.ln_pre(x)
        for b in self.blocks:
            x = b(x, False)
        return self.proj(self.ln_post(x[:, 0]))


class Text(nn.Module):
    def __init__(self, p, rank):
        super().__init__()
        w = p["tw"]
        self.tok = nn.Embedding(VOCAB, w)
        self.pos = nn.Parameter(torch.randn(p["context"], w) * 0.01)
        self.blocks = nn.ModuleList([Block(w, p["th"], rank) for _ in range(p["tl"])])
        self.ln = nn.LayerNorm(w)
        self.proj = Linear(w, p["embed"], bias=False, rank=rank)

    def forward(self, ids):
        x = self.tok(ids) + self.pos
        for b in self.blocks:
            x = b(x, True)
        x = self.ln(x)
        return self.proj(x[torch.arange(x.shape[0]), ids.argmax(-1)])


class Projector(nn.Module):
    """CKC's projector: Linear(D, 4D) -> BatchNorm1d -> ReLU -> Linear(4D, D)."""

    def __init__(self, d):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 4 * d), nn.BatchNorm1d(4 * d), nn.ReLU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return self.net(x)


def info_nce(a, b, scale):
    logits = scale * a @ b.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


class Step:
    def __init__(self, p, dev, mode):
        torch.manual_seed(0)
        self.dev, self.mode, self.p = dev, mode, p
        self.vision, self.text = Vision(p, p["lora"]).to(dev), Text(p, p["lora"]).to(dev)
        self.scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=dev))
        params = [self.scale] + [q for m in (self.vision, self.text) for q in m.parameters() if q.requires_grad]
        self.old = None
        if p["ckc"]:
            self.old = (Vision(p, p["lora"]).to(dev).eval(), Text(p, p["lora"]).to(dev).eval())
            for m in self.old:
                m.requires_grad_(False)
            self.projector = Projector(p["embed"]).to(dev)
            params += list(self.projector.parameters())
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=p["lr"], weight_decay=p["wd"])
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=dev).view(1, 3, 1, 1)

    def trainable(self):
        return sum(q.numel() for q in self.params)

    def __call__(self, px, ids):
        if px.dtype == torch.uint8:
            px = (px.to(self.dev).float() / 255 - self.mean) / self.std
            ids = ids.to(self.dev)
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.mode == "bf16"):
            img, txt = self.vision(px), self.text(ids)
        img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        scale = self.scale.exp()
        loss = info_nce(img, txt, scale)
        if self.old is not None:
            with torch.no_grad(), torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.mode == "bf16"):
                old = torch.cat([self.old[0](px), self.old[1](ids)]).float()
            z = F.normalize(old, dim=-1)
            cur = self.projector(torch.cat([img, txt]))
            loss = loss + info_nce(F.normalize(cur, dim=-1), z, scale)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.p["clip"] is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.p["clip"])
        self.opt.step()
        with torch.no_grad():
            self.scale.clamp_(0, math.log(100))
        return loss.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="vitb32", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--modes")
    ap.add_argument("--device")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--host-batch", action="store_true")
    a = ap.parse_args()
    p = PRESETS[a.preset]
    batch = a.batch or p["batch"]
    dev = torch.device(a.device or p["device"])
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for mode in (a.modes or p["modes"]).split(","):
        step = Step(p, dev, mode)
        gen = torch.Generator().manual_seed(0)
        size = p["image"]
        if a.host_batch:
            px = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
            ids = torch.randint(1, EOT - 1, (batch, p["context"]), generator=gen)
        else:
            px = torch.randn(batch, 3, size, size, generator=gen).to(dev)
            ids = torch.randint(1, EOT - 1, (batch, p["context"]), generator=gen).to(dev)
        ids[:, p["context"] // 2] = EOT
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(a.warmup + a.steps):
            sync()
            t = time.perf_counter()
            step(px, ids)
            sync()
            if i >= a.warmup:
                times.append((time.perf_counter() - t) * 1000)
        times.sort()
        ms = statistics.median(times)
        row = {"framework": "pytorch-eager", "torch": torch.__version__, "preset": a.preset, "mode": mode,
               "device": str(dev), "threads": torch.get_num_threads(), "batch": batch, "host_batch": a.host_batch,
               "trainable_parameters": step.trainable(), "steps": a.steps, "warmup": a.warmup,
               "ms_per_step": ms, "p90_ms": times[round((len(times) - 1) * 0.9)],
               "images_per_second": batch / (ms / 1000)}
        if cuda:
            free, total = torch.cuda.mem_get_info()
            row.update(peak_memory_bytes=torch.cuda.max_memory_allocated(), driver_used_bytes=total - free,
                       memory_kind="device")
        else:
            row.update(peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                       memory_kind="host-rss")
        print(json.dumps(row), flush=True)
        del step
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
