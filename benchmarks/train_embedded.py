"""Train the embedded models and write their weights (``torchray_like/benchmark/weights``).

Usage::

    python benchmarks/train_embedded.py                       # both models, shipped recipe
    python benchmarks/train_embedded.py --models embedded-vgg --out /tmp/w --epochs 2

Multi-label training (``BCEWithLogitsLoss``) on the ``"train"`` split of
:class:`~torchray_like.benchmark.embedded_data.EmbeddedShapes`, AdamW with a one-cycle learning
rate, random horizontal flips.  After training, the script reports the mean per-class average
precision (mAP) on the ``"test"`` split and the SHA-256 of each written file: paste the digests
into ``EMBEDDED_WEIGHTS`` of :mod:`torchray_like.benchmark.embedded_models` (and the figures into
``EMBEDDED_ACCURACY``) when you replace the shipped weights.

Bit-identical weights need the same seed, PyTorch version, thread count and CPU kind (float
reductions are ordered differently elsewhere); the accuracy is reproduced anyway.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

# Runnable from a source checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchray_like.benchmark.embedded_cli import name_list  # noqa: E402
from torchray_like.benchmark.embedded_data import (  # noqa: E402
    EMBEDDED_CLASSES,
    EMBEDDED_MEAN,
    EMBEDDED_STD,
    NUM_CLASSES,
    NUM_DISTRACTORS,
    EmbeddedShapes,
    embedded_collate,
)
from torchray_like.benchmark.embedded_models import (  # noqa: E402
    EMBEDDED_EXAMPLE_MODELS,
    EMBEDDED_MODELS,
    EMBEDDED_WEIGHTS,
    build_embedded_model,
)
from torchray_like.benchmark.embedded_vgg16 import deepen_embedded_vgg  # noqa: E402
from torchray_like.benchmark.runner import (  # noqa: E402
    device_arg,
    non_negative_int_arg,
    positive_int_arg,
    seed_arg,
    threads_arg,
)

#: The shipped recipe, per model.
RECIPE: Dict[str, Dict[str, float]] = {
    "embedded-vgg": {"epochs": 16, "train_size": 20000, "lr": 2e-3, "weight_decay": 5e-4,
                     "negatives": 0.0},
    "embedded-resnet": {"epochs": 14, "train_size": 20000, "lr": 4e-3, "weight_decay": 5e-4,
                        "negatives": 0.1},
}
# The transformer (Dosovitskiy et al. 2021; convolutional stem, Xiao et al. 2021) has less
# of a convolutional prior: the eight flips and quarter turns of the square (every class and
# distractor is drawn at random orientations, so the labels do not change) and shifts of up to
# ``shift`` pixels (reflected border; the 8-pixel token grid then falls anywhere on the
# objects), with the decoupled weight decay of the ViT/DeiT recipes.  Shipped weights: this
# recipe with --threads 1 --batch-size 64 (39 min on a shared CPU; test mAP 70 %).
RECIPE["embedded-vit"] = {"epochs": 8, "train_size": 20000, "lr": 1e-3, "weight_decay": 0.05,
                          "negatives": 0.1, "dihedral": 1.0, "shift": 4.0}

# VGG16's layout is embedded-vgg deepened with identity convolutions (deepen_embedded_vgg); only
# its classifier (on pool5's 2 x 2 map) is trained, on cached features of the images and their
# mirror images.
RECIPE["embedded-vgg16"] = {"epochs": 40, "train_size": 10000, "lr": 2e-3,
                            "weight_decay": 5e-4, "negatives": 0.1}

#: Weight of the auxiliary (distractor-kind) outputs in the loss, relative to the classes.
AUX_WEIGHT = 0.5


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Non-interpolated average precision of one class (mean precision at each positive)."""
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(np.float64)
    if hits.sum() == 0:
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def make_negatives(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Images with no object left: half blurred beyond recognition (σ of 3 to 8 px, as by
    extremal perturbation's blur pyramid and the insertion canvas), half a constant colour (0,
    the mean colour, as RISE's and deletion's fill, or a random one).  Without them the residual
    network called any featureless image a "disc"."""
    import torchvision.transforms.functional as TF
    n = len(x)
    sigma = float(3 + 5 * torch.rand((), generator=gen))
    blurred = TF.gaussian_blur(x, kernel_size=2 * int(3 * sigma) + 1, sigma=sigma)
    colour = torch.randn(n, 3, 1, 1, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) < 0.5)
    flat = colour.expand_as(x)
    return torch.where((torch.arange(n) % 2 == 0).view(-1, 1, 1, 1), blurred, flat)


def trim_head(model: nn.Module, name: str) -> nn.Module:
    """Keep the class outputs of the last layer (drop the auxiliary distractor outputs)."""
    if name == "embedded-vgg16":
        return trim_vgg16(model)
    if name == "embedded-vit":      # torchvision's VisionTransformer: heads.head
        return _trim_vit_head(model)
    last = model.classifier[3] if name == "embedded-vgg" else model.fc
    trimmed = nn.Linear(last.in_features, NUM_CLASSES)
    with torch.no_grad():
        trimmed.weight.copy_(last.weight[:NUM_CLASSES])
        trimmed.bias.copy_(last.bias[:NUM_CLASSES])
    if name == "embedded-vgg":
        model.classifier[3] = trimmed
    else:
        model.fc = trimmed
    return model


def _trim_vit_head(model: nn.Module) -> nn.Module:
    last = model.heads.head
    trimmed = nn.Linear(last.in_features, NUM_CLASSES)
    with torch.no_grad():
        trimmed.weight.copy_(last.weight[:NUM_CLASSES])
        trimmed.bias.copy_(last.bias[:NUM_CLASSES])
    model.heads.head = trimmed
    model.num_classes = NUM_CLASSES
    return model


def augment_square(x: torch.Tensor, gen: torch.Generator, shift: int) -> torch.Tensor:
    """Each image turned by a random multiple of 90 degrees, transposed or not, and shifted by
    up to ``shift`` pixels each way (reflected border), independently per image."""
    n, size = len(x), x.shape[-1]
    turns = torch.randint(0, 4, (n,), generator=gen)
    transpose = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(x)
    for k in range(4):
        for t in (False, True):
            pick = (turns == k) & (transpose == t)
            if pick.any():
                y = torch.rot90(x[pick], k, dims=(-2, -1))
                out[pick] = y.transpose(-2, -1) if t else y
    if shift:
        padded = nn.functional.pad(out, (shift,) * 4, mode="reflect")
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen).tolist()
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen).tolist()
        out = torch.stack([padded[i, :, dy[i]:dy[i] + size, dx[i]:dx[i] + size]
                           for i in range(n)])
    return out



def trim_vgg16(model: nn.Module) -> nn.Module:
    """embedded-vgg16: keep the class outputs of ``classifier.6``."""
    last = model.classifier[6]
    trimmed = nn.Linear(last.in_features, NUM_CLASSES)
    with torch.no_grad():
        trimmed.weight.copy_(last.weight[:NUM_CLASSES])
        trimmed.bias.copy_(last.bias[:NUM_CLASSES])
    model.classifier[6] = trimmed
    return model


@torch.no_grad()
def vgg16_features(model: nn.Module, images: torch.Tensor, batch_size: int = 200
                   ) -> torch.Tensor:
    """Flattened ``avgpool`` outputs of normalised images (the classifier's input)."""
    return torch.cat([torch.flatten(model.avgpool(model.features(images[b:b + batch_size])), 1)
                      for b in range(0, len(images), batch_size)])


def train_vgg16(out: str, seed: int, recipe: Dict[str, float], batch_size: int, workers: int,
                test_size: int, monitor: bool = False) -> Dict[str, object]:
    """embedded-vgg16: the shipped embedded-vgg deepened to VGG16's layout, a new classifier
    trained on its (fixed) features; return the test figures as train_one does."""
    from torchray_like.benchmark.embedded_models import load_embedded_model

    torch.manual_seed(seed)
    start = time.time()
    model = deepen_embedded_vgg(load_embedded_model("embedded-vgg"),
                                NUM_CLASSES + NUM_DISTRACTORS).eval()
    images, labels = draw_split("train", int(recipe["train_size"]), seed, workers)
    gen = torch.Generator().manual_seed(seed + 1)
    mean = torch.tensor(EMBEDDED_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(EMBEDDED_STD).view(1, 3, 1, 1)
    x = (images.float() / 255 - mean) / std
    k = int(round(recipe["negatives"] * len(x)))
    inputs = [x, x.flip(-1), make_negatives(x[:k], gen)]
    targets = torch.cat([labels, labels, torch.zeros_like(labels[:k])])
    feats = torch.cat([vgg16_features(model, part) for part in inputs])
    head = model.classifier
    steps = int(recipe["epochs"]) * (len(feats) // batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=recipe["lr"],
                            weight_decay=recipe["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=steps,
                                                pct_start=0.15)
    loss_fn = nn.BCEWithLogitsLoss(weight=torch.cat([
        torch.ones(NUM_CLASSES), torch.full((NUM_DISTRACTORS,), AUX_WEIGHT)]))
    for epoch in range(int(recipe["epochs"])):
        head.train()
        order = torch.randperm(len(feats), generator=gen)
        for b in range(len(feats) // batch_size):
            idx = order[b * batch_size:(b + 1) * batch_size]
            loss = loss_fn(head(feats[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if monitor:
            ev = evaluate(model, EmbeddedShapes("test", size=500, seed=0), classes=NUM_CLASSES)
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test mAP {100 * ev['map']:.2f} % "
                  "(500 images)", flush=True)
    return save_and_test(trim_vgg16(model.eval()), "embedded-vgg16", out, test_size, workers,
                         start)

def save_and_test(model: nn.Module, name: str, out: str, test_size: int, workers: int,
                  start: float) -> Dict:
    """Save ``model``'s weights under the shipped file name of ``name`` in ``out``, and return
    what a training run reports: the path, its SHA-256, the minutes since ``start``, the test
    metrics on ``test_size`` images and the exact-match rate on the first 64."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, EMBEDDED_WEIGHTS[name][0])
    torch.save(model.state_dict(), path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    test = evaluate(model, EmbeddedShapes("test", size=test_size, seed=0), workers=workers)
    small = evaluate(model, EmbeddedShapes("test", size=64, seed=0))
    return {"path": path, "sha256": digest, "minutes": (time.time() - start) / 60,
            "test": test, "exact_match_64": small["exact_match"]}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: EmbeddedShapes, batch_size: int = 100,
             workers: int = 0, classes: Optional[int] = None) -> Dict[str, object]:
    """mAP, per-class AP and exact-match accuracy (every sigmoid thresholded at 0.5)."""
    model.eval()
    scores: List[np.ndarray] = []
    truth: List[np.ndarray] = []
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=embedded_collate,
                        num_workers=workers)
    for x, targets in loader:
        scores.append(model(x)[:, :classes].numpy())
        truth.append(np.stack([t["multi_hot"].numpy() for t in targets]))
    s, t = np.concatenate(scores), np.concatenate(truth)
    aps = [average_precision(s[:, c], t[:, c] > 0) for c in range(s.shape[1])]
    exact = float(((s > 0) == (t > 0)).all(1).mean())
    return {"map": float(np.nanmean(aps)), "ap": aps, "exact_match": exact}


class _Raw(torch.utils.data.Dataset):
    """uint8 images ``(3, H, W)`` and multi-hot labels of a split (for caching)."""

    def __init__(self, data: EmbeddedShapes) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        image, ann = self.data.raw(i)
        # Targets: the classes, then the distractor kinds (auxiliary outputs, see train_one).
        y = torch.zeros(NUM_CLASSES + NUM_DISTRACTORS)
        y[torch.from_numpy(ann["labels"])] = 1
        y[NUM_CLASSES + torch.from_numpy(ann["distractor_labels"])] = 1
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), y


def draw_split(split: str, size: int, seed: int, workers: int):
    """Draw a split once into memory: ``(uint8 (n, 3, H, W), float multi-hot (n, C))``.

    Drawing costs about as much as a training pass over an image, so it is done once and every
    epoch reuses the images (8 000 images: 300 MB).
    """
    from tqdm import tqdm

    loader = DataLoader(_Raw(EmbeddedShapes(split, size=size, seed=seed)), batch_size=100,
                        num_workers=workers)
    xs, ys = [], []
    for x, y in tqdm(loader, desc=f"drawing {size} {split} images", unit="batch",
                     dynamic_ncols=True):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def train_one(name: str, out: str, seed: int, device: str, epochs: Optional[int],
              train_size: Optional[int], batch_size: int, workers: int,
              test_size: int, monitor: bool = False) -> Dict[str, object]:
    """Train ``name`` and save its state dict to ``out``; return the test figures."""
    from tqdm import tqdm

    recipe = dict(RECIPE[name])
    if epochs is not None:
        recipe["epochs"] = epochs
    if train_size is not None:
        recipe["train_size"] = train_size
    if name == "embedded-vgg16":     # deepened from embedded-vgg: only the classifier trains
        return train_vgg16(out, seed, recipe, batch_size, workers, test_size, monitor)
    torch.manual_seed(seed)
    # The network learns the distractor kinds too (extra outputs, cut off afterwards): like
    # features pretrained on many categories, its features then describe every object in the
    # image, not only the eight classes, and the classes are read out of them by the last layer.
    model = build_embedded_model(name, num_outputs=NUM_CLASSES + NUM_DISTRACTORS).to(device)
    images, labels = draw_split("train", int(recipe["train_size"]), seed, workers)
    n_batches = len(images) // batch_size
    steps = int(recipe["epochs"]) * n_batches
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"],
                            weight_decay=recipe["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=steps,
                                                pct_start=0.15)
    # The auxiliary outputs count half as much as the classes.
    loss_fn = nn.BCEWithLogitsLoss(weight=torch.cat([
        torch.ones(NUM_CLASSES), torch.full((NUM_DISTRACTORS,), AUX_WEIGHT)]).to(device))
    # Seeded batch order and flips: the same run on every machine.
    gen = torch.Generator().manual_seed(seed + 1)
    mean = torch.tensor(EMBEDDED_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(EMBEDDED_STD).view(1, 3, 1, 1)
    bar = tqdm(total=steps, desc=name, unit="batch", dynamic_ncols=True)
    start = time.time()
    for _epoch in range(int(recipe["epochs"])):
        model.train()
        order = torch.randperm(len(images), generator=gen)
        for b in range(n_batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            x = (images[idx].float() / 255 - mean) / std
            y = labels[idx]
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            if recipe.get("dihedral"):
                x = augment_square(x, gen, int(recipe.get("shift", 0)))
            k = int(round(recipe["negatives"] * len(x)))
            if k:   # the first k images of the (random) batch become negatives, no labels
                x = torch.cat([make_negatives(x[:k], gen), x[k:]])
                y = torch.cat([torch.zeros_like(y[:k]), y[k:]])
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if monitor:
            ev = evaluate(model, EmbeddedShapes("test", size=500, seed=0), classes=NUM_CLASSES)
            bar.write(f"epoch {_epoch + 1}: test mAP {100 * ev['map']:.2f} % (500 images)")
    bar.close()
    return save_and_test(trim_head(model.eval().cpu(), name), name, out, test_size, workers,
                         start)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train the embedded models (multi-label, BCEWithLogits) on the embedded data "
                    "set and write their state dicts; reports test mAP and SHA-256 digests.")
    parser.add_argument("--models", nargs="+", default=["all"], metavar="MODEL",
                        help=f"models to train, among "
                             f"{', '.join(EMBEDDED_MODELS + EMBEDDED_EXAMPLE_MODELS)}, comma- or "
                             "space-separated (default: all)")
    parser.add_argument("--seed", type=seed_arg, default=0,
                        help="seed of the data split, initialisation and batch order (default 0)")
    parser.add_argument("--out", default=os.path.join("torchray_like", "benchmark", "weights"),
                        help="output folder (default: the package's weights folder)")
    parser.add_argument("--device", type=device_arg, default="cpu",
                        help="torch device (default cpu)")
    parser.add_argument("--epochs", type=positive_int_arg, default=None,
                        help="epochs (default: the shipped recipe's)")
    parser.add_argument("--train-size", type=positive_int_arg, default=None,
                        help="training images (default: the shipped recipe's)")
    parser.add_argument("--batch-size", type=positive_int_arg, default=64)
    parser.add_argument("--test-size", type=positive_int_arg, default=1000,
                        help="test images for the reported mAP (default 1000)")
    parser.add_argument("--workers", type=non_negative_int_arg, default=1,
                        help="data-loading processes (default 1; images are drawn on the fly)")
    parser.add_argument("--threads", type=threads_arg, default=2,
                        help="torch intra-op threads (default 2)")
    parser.add_argument("--monitor", action="store_true",
                        help="print the test mAP on 500 images after every epoch")
    args = parser.parse_args(argv)
    try:
        names = name_list(args.models, EMBEDDED_MODELS + EMBEDDED_EXAMPLE_MODELS, "--models")
    except ValueError as error:
        parser.error(str(error))
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        parser.error(f"--device {args.device!r} is not usable here: {err}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for name in names:
            report(name, train_one(name, args.out, args.seed, str(device), args.epochs,
                                   args.train_size, args.batch_size, args.workers,
                                   args.test_size, args.monitor), args.test_size)
    finally:
        torch.set_num_threads(threads)
    return 0


def report(name: str, result: Dict, test_size: int) -> None:
    """Print one model's test figures, the file written and its digest."""
    test = result["test"]
    print(f"{name}: {result['minutes']:.1f} min, test mAP {100 * test['map']:.2f} % "
          f"({test_size} images), exact match {100 * test['exact_match']:.1f} %, "
          f"exact match on the first 64 {100 * result['exact_match_64']:.1f} %")
    print("  AP per class: " + ", ".join(
        f"{c} {100 * ap:.1f}" for c, ap in zip(EMBEDDED_CLASSES, test["ap"])))
    print(f"  wrote {result['path']}  sha256 {result['sha256']}")


if __name__ == "__main__":
    sys.exit(main())
