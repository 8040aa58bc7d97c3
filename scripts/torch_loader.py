#!/usr/bin/env python3
"""open_clip's training input pipeline in PyTorch, for `scripts/bench-pipeline.sh`: a
torchvision DataLoader over a JSONL manifest (Recall's format), PIL decode + convert("RGB"),
RandomResizedCrop(size, scale, bicubic) + ToTensor + Normalize(CLIP's constants), shuffled,
`--workers` worker processes. Prints one JSON line: images per second after the first batch.

    python3 scripts/torch_loader.py DIR --size 224 --batch 128 --batches 20 --workers 2
"""

import argparse
import json
import os
import time

import torch
from PIL import Image
from torchvision import transforms as T

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class Manifest(torch.utils.data.Dataset):
    def __init__(self, root, transform):
        with open(os.path.join(root, "train.jsonl")) as f:
            self.rows = [json.loads(line) for line in f if line.strip()]
        self.root, self.transform = root, transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        img = Image.open(os.path.join(self.root, row["image"])).convert("RGB")
        return self.transform(img), row["captions"][0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scale", type=float, nargs=2, default=(0.9, 1.0))
    args = ap.parse_args()
    torch.set_num_threads(1)
    transform = T.Compose([
        T.RandomResizedCrop(args.size, scale=tuple(args.scale), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])
    loader = torch.utils.data.DataLoader(
        Manifest(args.root, transform), batch_size=args.batch, shuffle=True, num_workers=args.workers,
        drop_last=True, persistent_workers=args.workers > 0,
    )
    images, started = 0, None
    for k, (x, _) in enumerate(loader):
        if started is None:
            started = time.perf_counter()
        else:
            images += x.shape[0]
        if k == args.batches:
            break
    seconds = time.perf_counter() - started
    print(json.dumps({"workers": args.workers, "images": images, "seconds": seconds,
                      "images_per_second": images / seconds}))


if __name__ == "__main__":
    main()
