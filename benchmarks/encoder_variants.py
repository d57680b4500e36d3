"""Stage-1 variants on a cluttered canvas, then what a privileged policy gains with them (``object_patches.py``).

    python benchmarks/encoder_variants.py --env gfenv/FashionMNIST60-v0 --data-root DATA --out runs/variants/pre3 \\
        [--epochs 4] [--pretrain-epochs 3] [--glance-size 12] [--seed 0]
    python benchmarks/encoder_variants.py --data-root DATA --out runs/variants/plain28 --pretrain-epochs 3 \
        --pretrain-size 28 --pretrain-only

Two questions about the real-data recipe (docs/real_data.md) that the package's settings do not ask:

- ``--pretrain-epochs N``: GFNet starts stage 1 from encoders pretrained on whole images (ImageNet). In miniature:
  first train one ``small_cnn`` with a linear head as a plain classifier on random P x P crops of the *uncluttered*
  base images (the garments without canvas or clutter; SGD Nesterov, lr 0.05 cosine, batch 128), print its accuracy
  on the centre P x P crop of the first 2,000 validation images, and start both encoders of stage 1 from it
  (``--pretrain-size N``: crops of N x N instead, e.g. the whole 28 x 28 garment; ``--pretrain-only``: stop there,
  which measures what one view of the plain garment tells this encoder);
- ``--glance-size G``: the glance at G x G instead of P x P (GFNet's glance is the image at the patch size), by
  replacing ``gfenv.glimpse.glance`` for this process.

Then stage 1 with the package's defaults (``--epochs``) into ``OUT/stage1`` and ``object_patches.py`` on the first
2,000 validation images: the ``object`` policy (knows where the garment is), ``random`` and ``center`` on the grid.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gfenv.glimpse as glimpse


def patch_glance(size: int) -> None:
    """Every glance of this process at ``size`` x ``size`` (the modules that imported ``glance`` included)."""
    import gfenv.cache
    import gfenv.env
    import gfenv.flops
    import gfenv.train.common

    original = glimpse.glance

    def glance(images: torch.Tensor, _size: int, mode: str = "bilinear") -> torch.Tensor:
        return original(images, size, mode)

    for module in (glimpse, gfenv.train.common, gfenv.env, gfenv.cache, gfenv.flops):
        module.glance = glance


def random_crops(x: torch.Tensor, p: int, gen: torch.Generator) -> torch.Tensor:
    """A p x p crop of each image at a uniformly random place. (``gfenv.glimpse.crop`` cuts the same pixels, but in
    another memory layout, which changes the convolutions' float sums and so the printed figures.)"""
    b, _, h, w = x.shape
    top = torch.randint(0, h - p + 1, (b,), generator=gen)
    left = torch.randint(0, w - p + 1, (b,), generator=gen)
    rows = (top[:, None] + torch.arange(p))[:, :, None]
    cols = (left[:, None] + torch.arange(p))[:, None, :]
    return x[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def pretrain(task, p: int, epochs: float, seed: int, path: Path) -> None:
    """A small_cnn + linear head on random p x p crops of the base images; its state dict to ``path``."""
    from gfenv.backbones import SmallCNN

    train, val = task.source("train").base, task.source("val").base
    enc = SmallCNN(train.image_shape[0])
    head = torch.nn.Linear(enc.feature_dim, train.num_classes)
    opt = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)
    per_epoch = len(train) // 128
    iters = max(1, int(epochs * per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, iters) / iters)))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for i in range(iters):
        if i % per_epoch == 0:
            order = torch.randperm(len(train), generator=gen)
        x, y = train.get(order[(i % per_epoch) * 128:(i % per_epoch + 1) * 128])
        enc.train()
        loss = F.cross_entropy(head(enc(random_crops(x, p, gen))[0]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    enc.eval()
    with torch.no_grad():
        x, y = val.get(torch.arange(min(2000, len(val))))
        top, left = (x.shape[-2] - p) // 2, (x.shape[-1] - p) // 2
        acc = (head(enc(x[..., top:top + p, left:left + p])[0]).argmax(1) == y).float().mean().item() * 100
    print(f"pretraining: {iters} iterations in {time.time() - t0:.0f} s; validation accuracy on the centre {p} x {p} "
          f"crop of the plain images: {acc:.2f} %", flush=True)
    torch.save(enc.state_dict(), path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="gfenv/FashionMNIST60-v0", help="a registered cluttered-canvas task")
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--epochs", type=float, default=4.0, help="stage-1 epochs")
    p.add_argument("--pretrain-epochs", type=float, default=0.0)
    p.add_argument("--pretrain-size", type=int, default=None, help="crop side of the pretraining (default P)")
    p.add_argument("--pretrain-only", action="store_true")
    p.add_argument("--glance-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.glance_size is not None:
        patch_glance(args.glance_size)

    import gfenv.train.stage1 as stage1
    from gfenv.task import registered_words, resolve_task, task_words
    from gfenv.train.common import seed_everything

    task = resolve_task(task_words({**registered_words(args.env), "data_root": args.data_root}),
                        need_checkpoint=False)
    words = task.model_words
    seed_everything(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.pretrain_epochs > 0:
        weights = args.out / "pretrained_encoder.pt"
        pretrain(task, args.pretrain_size or int(words["patch_size"]), args.pretrain_epochs, args.seed, weights)
        if args.pretrain_only:
            return 0

        class Pretrained(stage1.GFNetModel):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                state = torch.load(weights, weights_only=True)
                self.glance_encoder.load_state_dict(state)
                self.focus_encoder.load_state_dict(state)

        stage1.GFNetModel = Pretrained
    cfg = stage1.Stage1Config(dataset=task.dataset, dataset_kwargs=task.source_kwargs, env_id=args.env,
                              epochs=args.epochs, seed=args.seed, **words)
    stage1.train_stage1(cfg, args.out / "stage1", progress=False)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import object_patches

    return object_patches.main(["--env", args.env, "--env-kwargs", f"data_root={args.data_root}",
                                f"checkpoint={args.out / 'stage1' / 'model.pt'}", "--episodes", "2000",
                                "--split", "val", "--seed", str(args.seed)])


if __name__ == "__main__":
    sys.exit(main())
