r"""The embedded data set: procedurally generated, VOC-shaped multi-label images.

A stand-in for PASCAL VOC that needs no download: every image is drawn on the fly from a seed,
so the same index gives the same image (and annotations) on every machine, and the benchmark
of :mod:`torchray_like.benchmark` runs offline with the small models of
:mod:`torchray_like.benchmark.embedded_models`.

How an image is made (``IMAGE_SIZE`` = 64 pixels square, RGB; all sizes below are in pixels of
that image):

1. **Background**: a smooth random colour field (bilinear upsampling of a coarse random grid),
   a faint random grating, pixel noise, one to three soft-edged *texture patches* (speckle,
   fine wavy grain or dots, like foliage or gravel in a photograph), up to three long thin
   *wires*, and *clutter* — 8 to 19 short strokes and dots in the object colours, too small to
   be objects — so that strong edges are everywhere, not only on objects.
2. **Objects**: one to three objects of the classes in :data:`EMBEDDED_CLASSES`, at uniformly
   random positions (the border may cut up to about a third of an object, as in photographs),
   sizes (diameters 16 to 36 pixels, log-uniform), rotations and colours.  The six *shape*
   classes are filled with a plain or a shaded colour; the two *texture* classes are discs,
   squares or hexagons filled with fine stripes or a checkerboard of two colours.  Every colour
   is drawn from one palette shared by all classes and distractors, so colour says nothing
   about the class: shape and texture do.
3. **Distractors**: zero to three objects of no class (:data:`EMBEDDED_DISTRACTORS`: ellipses,
   bars, crescents, half discs, L and T shapes, "peanuts", broken rings), 10 to 46 pixels
   across, in the same colours, with the shape classes' fills, with dots or waves, or with the
   very stripes and checkerboards of the texture classes (a striped bar is not a "stripes":
   that class is a striped *compact* shape).  Many are look-alikes of a class (a broken ring,
   a T beside a cross) and many are larger than the objects.
4. Objects and distractors are stacked in a random order, so they partly overlap; a class
   object keeps at least 65 % of its area visible, border and occlusion together (otherwise
   the scene is placed again).  The image is quantised to 8 bits, like a photograph.

Annotations follow PASCAL VOC: one box, one (visible-part) mask and one ``difficult`` flag per
object, and the multi-label set of classes present.

**Difficult** (the pointing game's hard subset, after Zhang et al. 2016, who single out small
objects among distractors): an object is difficult when its visible area is below a quarter of
the image and it lies *beside* — within ``IMAGE_SIZE / 16`` = 4 pixels, box to box — an object
of another class or a distractor, that neighbour being at least as large (visible area) as the
object.  An ``(image, class)`` pair is difficult when the class's total visible area is below a
quarter of the image and one of its objects is difficult.  About 40 % of the test pairs are.

Randomness: image ``i`` of a split is drawn by its own :class:`numpy.random.Generator`
(PCG64 seeded by ``SeedSequence(seed, spawn_key=(split, i))``), so images can be read in any
order, by any number of workers, and the train and test splits never share an image.  All
drawing is plain NumPy arithmetic and the result is quantised to ``uint8``: the same bytes on
every machine (up to a pixel exactly on an edge if two platforms' ``sin`` differ in the last
bit).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .embedded_shapes import shape_sdf

__all__ = [
    "EMBEDDED_CLASSES", "NUM_CLASSES", "EMBEDDED_DISTRACTORS", "NUM_DISTRACTORS", "IMAGE_SIZE",
    "EMBEDDED_MEAN", "EMBEDDED_STD",
    "EmbeddedShapes", "render_image", "embedded_collate", "normalize", "denormalize",
]

#: Class names, in label order (label ``k`` is ``EMBEDDED_CLASSES[k]``).
EMBEDDED_CLASSES: Tuple[str, ...] = (
    "disc", "square", "triangle", "cross", "ring", "star", "stripes", "checker")
NUM_CLASSES = len(EMBEDDED_CLASSES)

#: Side of the (square) images in pixels.
IMAGE_SIZE = 64

#: Per-channel mean and standard deviation used by :func:`normalize` (round values close to the
#: train split's statistics; the models expect normalised input, so ``0`` is about the mean
#: colour — what RISE and extremal perturbation fade to).
EMBEDDED_MEAN: Tuple[float, float, float] = (0.5, 0.5, 0.5)
EMBEDDED_STD: Tuple[float, float, float] = (0.25, 0.25, 0.25)

_SPLITS = {"train": 0, "test": 1}

# Object colours, shared by every class and every distractor (so colour is no cue).
_PALETTE = np.array([
    (0.86, 0.16, 0.14),   # red
    (0.20, 0.68, 0.24),   # green
    (0.18, 0.34, 0.86),   # blue
    (0.95, 0.84, 0.18),   # yellow
    (0.18, 0.80, 0.84),   # cyan
    (0.80, 0.24, 0.76),   # magenta
    (0.96, 0.55, 0.12),   # orange
    (0.95, 0.95, 0.95),   # white
    (0.07, 0.07, 0.07),   # black
], dtype=np.float64)

_SHAPE_CLASSES = ("disc", "square", "triangle", "cross", "ring", "star")
_TEXTURE_CLASSES = ("stripes", "checker")
_DISTRACTORS = ("ellipse", "bar", "crescent", "half_disc", "ell", "peanut", "arc", "tee")
#: Names of the distractor kinds (``distractor_labels`` index them; no class of the data set).
EMBEDDED_DISTRACTORS: Tuple[str, ...] = _DISTRACTORS
NUM_DISTRACTORS = len(_DISTRACTORS)
# Distractor fills: the shape classes' fills, two textures of no class, and the two class
# textures (a striped bar is no "stripes": that class is a striped disc, square or hexagon).
_DISTRACTOR_FILLS = ("solid", "shaded", "dots", "waves", "stripes", "checker")
_DISTRACTOR_FILL_P = (0.2, 0.15, 0.15, 0.1, 0.2, 0.2)

_MIN_DIAMETER, _MAX_DIAMETER = 16.0, 36.0       # class objects, pixels at IMAGE_SIZE
_DISTRACTOR_DIAMETER = (10.0, 46.0)
_MIN_VISIBLE = 0.65                               # visible fraction of a class object
_BESIDE = IMAGE_SIZE / 16                        # "beside": box-to-box gap in pixels
_INSIDE = 0.35                                    # centre margin, in radii
_CLUTTER = (8, 20)
_PATCHES = (1, 4)       # 1 to 3 texture patches
_WIRES = (0, 4)         # 0 to 3 wires
_DISTRACTOR_P = [0.2, 0.35, 0.3, 0.15]
_SHAPE_FILLS = ["solid", "shaded"]


# ---------------------------------------------------------------------------------------------
# Fills
# ---------------------------------------------------------------------------------------------


def _colour(rng: np.random.Generator, avoid: Optional[np.ndarray] = None) -> np.ndarray:
    """A palette colour with a little jitter, not too close to ``avoid``."""
    for _ in range(8):
        c = np.clip(_PALETTE[rng.integers(len(_PALETTE))] + rng.uniform(-0.07, 0.07, 3), 0, 1)
        if avoid is None or np.abs(c - avoid).max() > 0.3:
            return c
    return c


def _fill(kind: str, px: np.ndarray, py: np.ndarray, rng: np.random.Generator,
          base: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``(h, w, 3)`` colours of a fill pattern on the local grid."""
    shape = px.shape + (3,)
    c1 = _colour(rng, avoid=base)
    if kind == "solid":
        return np.broadcast_to(c1, shape)
    if kind == "noise":
        return np.clip(c1 + rng.normal(0, 0.07, px.shape)[..., None], 0, 1)
    if kind == "shaded":
        t = rng.uniform(0, 2 * np.pi)
        g = (px * math.cos(t) + py * math.sin(t)) / (np.abs(px).max() + 1)
        return np.clip(c1 * (1 + 0.35 * g[..., None]), 0, 1)
    c2 = _colour(rng, avoid=c1)
    period = rng.uniform(3.6, 5.0) * scale
    t = rng.uniform(0, np.pi)
    u = px * math.cos(t) + py * math.sin(t)
    if kind == "stripes":
        sel = np.floor(u / (period / 2)) % 2 == 0
    elif kind == "checker":
        v = -px * math.sin(t) + py * math.cos(t)
        sel = (np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2 == 0
    elif kind == "dots":     # distractor texture: a lattice of round dots
        v = -px * math.sin(t) + py * math.cos(t)
        fu = u / period - np.round(u / period)
        fv = v / period - np.round(v / period)
        sel = fu * fu + fv * fv < 0.09
    elif kind == "waves":    # distractor texture: wavy bands
        v = -px * math.sin(t) + py * math.cos(t)
        sel = np.sin(2 * np.pi * (u + 2.0 * np.sin(v / (2.0 * scale))) / (1.8 * period)) > 0
    else:
        raise AssertionError(kind)
    return np.where(sel[..., None], c1, c2)


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------


def _upsample_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear-interpolation matrix ``(n_out, n_in)`` (align-corners)."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    scale = size / IMAGE_SIZE
    base = rng.uniform(0.2, 0.8, 3)
    cells = int(rng.integers(3, 7))
    grid = rng.uniform(-0.22, 0.22, (cells, cells, 3)) + base
    up = _upsample_matrix(size, cells)
    img = np.stack([up @ grid[:, :, c] @ up.T for c in range(3)], axis=-1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    t = rng.uniform(0, np.pi)
    freq = rng.uniform(0.25, 1.0) / scale
    img += rng.uniform(0.0, 0.1) * np.sin(freq * (xx * math.cos(t) + yy * math.sin(t)))[..., None]
    img += rng.normal(0, 0.025, (size, size, 1))
    # Texture patches (think foliage, gravel, fabric): soft-edged regions of speckle, fine wavy
    # grain or dots, so that strong edges are not only where objects are.
    for _ in range(int(rng.integers(*_PATCHES))):
        cx, cy = rng.uniform(0, size, 2)
        rad = rng.uniform(8, 22) * scale
        soft = np.clip((rad - np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)) / (3 * scale), 0, 1)
        kind = int(rng.integers(3))
        if kind == 0:
            pattern = np.clip(rng.normal(0, 1, (size, size)), -2, 2)
        else:
            t = rng.uniform(0, np.pi)
            u = xx * math.cos(t) + yy * math.sin(t)
            v = -xx * math.sin(t) + yy * math.cos(t)
            period = rng.uniform(2.2, 3.5) * scale
            if kind == 1:
                pattern = np.sin(2 * np.pi * (u + 1.5 * scale * np.sin(v / (2.5 * scale)))
                                 / period)
            else:
                fu, fv = u / period - np.round(u / period), v / period - np.round(v / period)
                pattern = np.where(fu * fu + fv * fv < 0.08, 1.5, -0.5)
        tint = rng.uniform(-1, 1, 3)
        img += (rng.uniform(0.1, 0.25) * soft * pattern)[..., None] * tint
    # Wires: long thin lines, straight or gently waving, across the image.
    for _ in range(int(rng.integers(*_WIRES))):
        x0, y0 = rng.uniform(0, size, 2)
        t = rng.uniform(0, np.pi)
        amp, wavelength = rng.uniform(0, 3) * scale, rng.uniform(15, 40) * scale
        phase, width = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.6) * scale
        u = (xx - x0) * math.cos(t) + (yy - y0) * math.sin(t)
        v = -(xx - x0) * math.sin(t) + (yy - y0) * math.cos(t)
        d = np.abs(v - amp * np.sin(2 * np.pi * u / wavelength + phase)) - width
        alpha = (np.clip(0.5 - d, 0, 1) * rng.uniform(0.5, 1.0))[..., None]
        img *= 1 - alpha
        img += alpha * _colour(rng)
    # Clutter: short strokes and dots in object colours, edges everywhere.
    for _ in range(int(rng.integers(*_CLUTTER))):
        c = _colour(rng)
        x0, y0 = rng.uniform(0, size, 2)
        if rng.random() < 0.6:
            length, t = rng.uniform(2, 6) * scale, rng.uniform(0, np.pi)
            x1, y1 = x0 + length * math.cos(t), y0 + length * math.sin(t)
            width = rng.uniform(0.4, 0.8) * scale
            lo_x, hi_x = int(max(min(x0, x1) - 3, 0)), int(min(max(x0, x1) + 4, size))
            lo_y, hi_y = int(max(min(y0, y1) - 3, 0)), int(min(max(y0, y1) + 4, size))
            if hi_x <= lo_x or hi_y <= lo_y:
                continue
            py, px = yy[lo_y:hi_y, lo_x:hi_x], xx[lo_y:hi_y, lo_x:hi_x]
            ex, ey = x1 - x0, y1 - y0
            tt = np.clip(((px - x0) * ex + (py - y0) * ey) / (ex * ex + ey * ey), 0, 1)
            d = np.sqrt((px - x0 - tt * ex) ** 2 + (py - y0 - tt * ey) ** 2) - width
        else:
            rad = rng.uniform(0.7, 1.6) * scale
            lo_x, hi_x = int(max(x0 - rad - 2, 0)), int(min(x0 + rad + 3, size))
            lo_y, hi_y = int(max(y0 - rad - 2, 0)), int(min(y0 + rad + 3, size))
            if hi_x <= lo_x or hi_y <= lo_y:
                continue
            py, px = yy[lo_y:hi_y, lo_x:hi_x], xx[lo_y:hi_y, lo_x:hi_x]
            d = np.sqrt((px - x0) ** 2 + (py - y0) ** 2) - rad
        alpha = np.clip(0.5 - d, 0, 1)[..., None]
        region = img[lo_y:hi_y, lo_x:hi_x]
        region *= 1 - alpha
        region += alpha * c
    return img


class _Item:
    """One drawn object (a class object or a distractor), before occlusion."""

    __slots__ = ("label", "kind", "fill", "cx", "cy", "r", "angle", "area")

    def __init__(self, label: int, kind: str, fill: str, cx: float, cy: float, r: float,
                 angle: float) -> None:
        self.label, self.kind, self.fill = label, kind, fill
        self.cx, self.cy, self.r, self.angle = cx, cy, r, angle
        self.area = 0


def _draw_item(item: _Item, img: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Paint ``item`` onto ``img`` in place; return its alpha coverage over the image.

    Sets ``item.area``, the shape's area in pixels including any part outside the image.
    """
    scale = size / IMAGE_SIZE
    pad = item.r * 1.25 + 2
    # The local grid is not clipped to the image: the area counts parts cut off by the border,
    # and the random draws do not depend on where the object lies.
    x0, y0 = int(math.floor(item.cx - pad)), int(math.floor(item.cy - pad))
    x1, y1 = int(math.ceil(item.cx + pad)) + 1, int(math.ceil(item.cy + pad)) + 1
    py, px = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    px -= item.cx
    py -= item.cy
    sdf = shape_sdf(item.kind, px, py, item.r, item.angle, rng)
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)
    item.area = int((alpha >= 0.5).sum())
    lo_x, hi_x, lo_y, hi_y = max(x0, 0), min(x1, size), max(y0, 0), min(y1, size)
    region = img[lo_y:hi_y, lo_x:hi_x]
    colours = _fill(item.fill, px, py, rng, base=region.mean(axis=(0, 1)), scale=scale)
    crop = (slice(lo_y - y0, hi_y - y0), slice(lo_x - x0, hi_x - x0))
    a = alpha[crop][..., None]
    region *= 1 - a
    region += a * np.broadcast_to(colours, alpha.shape + (3,))[crop]
    full = np.zeros((size, size))
    full[lo_y:hi_y, lo_x:hi_x] = alpha[crop]
    return full


def _box_gap(a: np.ndarray, b: np.ndarray) -> float:
    """Gap in pixels between two xyxy boxes (0 when they touch or overlap), Chebyshev."""
    dx = max(a[0] - b[2], b[0] - a[2], 0.0)
    dy = max(a[1] - b[3], b[1] - a[3], 0.0)
    return float(max(dx, dy))


def _mask_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def _new_items(rng: np.random.Generator, scale: float) -> List[_Item]:
    """Draw the scene's class objects and distractors (unplaced), in stacking order."""
    n_obj = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    n_dis = int(rng.choice([0, 1, 2, 3], p=_DISTRACTOR_P))
    items: List[_Item] = []
    for _ in range(n_obj):
        label = int(rng.integers(NUM_CLASSES))
        name = EMBEDDED_CLASSES[label]
        if name in _TEXTURE_CLASSES:
            kind = str(rng.choice(["disc", "square", "hexagon"]))
            fill = name
        else:
            kind = name
            fill = str(rng.choice(_SHAPE_FILLS))
        diameter = math.exp(rng.uniform(math.log(_MIN_DIAMETER), math.log(_MAX_DIAMETER)))
        items.append(_Item(label, kind, fill, 0, 0, diameter * scale / 2,
                           rng.uniform(0, 2 * np.pi)))
    for _ in range(n_dis):
        kind = str(rng.choice(_DISTRACTORS))
        fill = str(rng.choice(_DISTRACTOR_FILLS, p=_DISTRACTOR_FILL_P))
        diameter = math.exp(rng.uniform(*np.log(_DISTRACTOR_DIAMETER)))
        items.append(_Item(-1, kind, fill, 0, 0, diameter * scale / 2, rng.uniform(0, 2 * np.pi)))
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def _place_items(items: List[_Item], img: np.ndarray, rng: np.random.Generator, size: int
                 ) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Place and draw ``items`` over a copy of ``img``: the canvas and each item's visible mask.

    A crowded draw may give up items: they are removed from ``items`` (in place), and the masks
    returned are aligned with what remains.
    """
    for attempt in range(40):
        # Positions anywhere, the border may cut an object (as in photographs): its centre is
        # at least 0.35 radius inside the image.
        for it in items:
            m = _INSIDE * it.r
            it.cx, it.cy = rng.uniform(m, size - m, 2)
        canvas = img.copy()
        alphas = [_draw_item(it, canvas, rng, size) for it in items]
        # Visible parts: what later items do not cover.
        cover = np.zeros((size, size), dtype=bool)
        masks: List[np.ndarray] = []
        failing = []
        for it, alpha in zip(reversed(items), reversed(alphas)):
            full = alpha >= 0.5
            mask = full & ~cover
            masks.append(mask)
            cover |= full
            if it.label >= 0 and mask.sum() < max(_MIN_VISIBLE * it.area, 1):
                failing.append(it)
        masks.reverse()
        if not failing:
            break
        if attempt >= 8 and attempt % 4 == 0:
            # A crowded draw: give up an item (a distractor first, then a class object).
            drop = next((it for it in items if it.label < 0), None)
            if drop is None and len(items) > 1:
                drop = failing[0]
            if drop is not None:
                i = items.index(drop)
                del items[i], masks[i]
    return canvas, masks


def _difficult(labels: List[int], masks: List[np.ndarray], boxes: List[np.ndarray],
               dmasks: List[np.ndarray], dboxes: List[np.ndarray], size: int) -> List[bool]:
    """Per class object: small, and beside a neighbour at least as large (module notes)."""
    area = float(size * size)
    gap = _BESIDE * (size / IMAGE_SIZE)
    difficult = []
    for i, (label, mask) in enumerate(zip(labels, masks)):
        a = mask.sum()
        small = a < area / 4
        # A neighbour at least as large as the object: another class, or a distractor.
        beside = any(labels[j] != label and masks[j].sum() >= a
                     and _box_gap(boxes[i], boxes[j]) <= gap
                     for j in range(len(masks)) if j != i)
        beside |= any(dmask.sum() >= a and _box_gap(boxes[i], dboxes[j]) <= gap
                      for j, dmask in enumerate(dmasks))
        difficult.append(bool(small and beside))
    return difficult


def render_image(rng: np.random.Generator, size: int = IMAGE_SIZE
                 ) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Draw one image and its annotations from ``rng``.

    Parameters
    ----------
    rng : numpy.random.Generator
        The image's generator (consumed).
    size : int
        Side in pixels (the data set uses :data:`IMAGE_SIZE`; other sizes scale the objects).

    Returns
    -------
    image : numpy.ndarray
        ``(size, size, 3)`` ``uint8``.
    annotations : dict
        ``labels`` (K,) int64, ``masks`` (K, size, size) bool (visible parts), ``boxes`` (K, 4)
        float32 xyxy, ``difficult`` (K,) bool, and ``distractor_masks`` (D, size, size) bool.
    """
    img = _background(rng, size)
    items = _new_items(rng, size / IMAGE_SIZE)
    canvas, masks = _place_items(items, img, rng, size)
    objects = [(it, m) for it, m in zip(items, masks) if it.label >= 0 and m.any()]
    distractors = [(it, m) for it, m in zip(items, masks) if it.label < 0 and m.any()]
    labels = [it.label for it, _ in objects]
    omasks = [m for _, m in objects]
    dmasks = [m for _, m in distractors]
    boxes = [_mask_box(m) for m in omasks]
    dboxes = [_mask_box(m) for m in dmasks]
    difficult = _difficult(labels, omasks, boxes, dmasks, dboxes, size)
    image = np.clip(np.round(canvas * 255), 0, 255).astype(np.uint8)
    ann = {
        "labels": np.array(labels, dtype=np.int64),
        "masks": np.stack(omasks) if omasks else np.zeros((0, size, size), dtype=bool),
        "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
        "difficult": np.array(difficult, dtype=bool),
        "distractor_masks": np.stack(dmasks) if dmasks
        else np.zeros((0, size, size), dtype=bool),
        "distractor_labels": np.array([_DISTRACTORS.index(d.kind) for d, _ in distractors],
                                      dtype=np.int64),
    }
    return image, ann


# ---------------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------------


def normalize(image: torch.Tensor) -> torch.Tensor:
    """Map ``[0, 1]`` images ``(3, H, W)`` or ``(N, 3, H, W)`` to the models' input scale."""
    mean = torch.tensor(EMBEDDED_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(EMBEDDED_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` (for display), clamped to ``[0, 1]``."""
    mean = torch.tensor(EMBEDDED_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(EMBEDDED_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1)


class EmbeddedShapes(Dataset):
    """The embedded data set: seeded, procedurally drawn VOC-like images (see the module notes).

    Parameters
    ----------
    split : {"train", "test"}
        The two splits never share an image.
    size : int, optional
        Number of images (default 10 000 for ``"train"``, 1 000 for ``"test"``).  Image ``i`` is
        the same whatever ``size`` is: a smaller set is a prefix of a larger one.
    seed : int
        Seed of the split (default 0, the one the shipped models were trained and tested with).
    transform : callable, optional
        Applied to the image tensor after normalisation.
    normalized : bool
        ``True`` (default): images are normalised with :data:`EMBEDDED_MEAN` /
        :data:`EMBEDDED_STD`, what the embedded models expect (``0`` is the mean colour).
        ``False``: images in ``[0, 1]``.

    Items
    -----
    ``dataset[i]`` is ``(image, target)``: ``image`` a ``(3, 64, 64)`` float32 tensor
    (:data:`IMAGE_SIZE`), and ``target`` a dict in the style of torchvision's VOC detection targets:

    ``boxes``
        ``(K, 4)`` float32, ``x1, y1, x2, y2`` in pixels, the inclusive bounding box of the
        object's mask (``torchvision.ops.masks_to_boxes``'s convention).
    ``labels``
        ``(K,)`` int64 class indices into :data:`EMBEDDED_CLASSES`.
    ``masks``
        ``(K, H, W)`` bool, the visible part of each object.
    ``difficult``
        ``(K,)`` bool, per object (see the module notes).
    ``class_ids``
        ``(L,)`` int64, the sorted distinct classes present (the multi-label target).
    ``class_difficult``
        ``(L,)`` bool, whether each ``(image, class_ids[l])`` pair is difficult.
    ``multi_hot``
        ``(C,)`` float32, 1 for the classes present (a ``BCEWithLogits`` target).
    ``image_size``
        ``(H, W)`` tuple of ints.
    ``index``
        The item's index.

    Use :func:`embedded_collate` to batch items (targets stay a list).
    """

    def __init__(self, split: str = "train", size: Optional[int] = None, seed: int = 0,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 normalized: bool = True) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if size is None:
            size = 10_000 if split == "train" else 1_000
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.transform, self.normalized = transform, bool(normalized)
        self.classes = EMBEDDED_CLASSES

    def __len__(self) -> int:
        return self.size

    def generator(self, index: int) -> np.random.Generator:
        """The generator that draws image ``index``."""
        return np.random.Generator(np.random.PCG64(
            np.random.SeedSequence(self.seed, spawn_key=(_SPLITS[self.split], int(index)))))

    def raw(self, index: int) -> Tuple[np.ndarray, Dict[str, Any]]:
        """``(uint8 image (H, W, 3), annotations)`` as drawn by :func:`render_image`."""
        index = self._check_index(index)
        return render_image(self.generator(index))

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a data set of {self.size} images")
        return int(index)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        index = self._check_index(index)
        image, ann = render_image(self.generator(index))
        # NumPy, not torch, for the per-pixel work: tiny torch ops pay thread-pool overhead
        # that dominates when the cores are busy (e.g. training in the main process).
        pixels = image.astype(np.float32) / np.float32(255)
        if self.normalized:
            pixels = (pixels - np.asarray(EMBEDDED_MEAN, np.float32)) / np.asarray(
                EMBEDDED_STD, np.float32)
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        if self.transform is not None:
            x = self.transform(x)
        labels_np, masks_np, difficult_np = ann["labels"], ann["masks"], ann["difficult"]
        class_ids_np = np.unique(labels_np)      # sorted
        area = masks_np.shape[-1] * masks_np.shape[-2]
        class_difficult_np = np.zeros(len(class_ids_np), dtype=bool)
        for k, c in enumerate(class_ids_np):
            mine = labels_np == c
            total = int(masks_np[mine].any(0).sum())
            class_difficult_np[k] = bool(difficult_np[mine].any()) and total < area / 4
        labels = torch.from_numpy(labels_np)
        masks = torch.from_numpy(masks_np)
        difficult = torch.from_numpy(difficult_np)
        class_ids = torch.from_numpy(class_ids_np)
        class_difficult = torch.from_numpy(class_difficult_np)
        multi_hot = torch.zeros(NUM_CLASSES)
        multi_hot[class_ids] = 1
        target = {
            "boxes": torch.from_numpy(ann["boxes"]),
            "labels": labels,
            "masks": masks,
            "difficult": difficult,
            "class_ids": class_ids,
            "class_difficult": class_difficult,
            "multi_hot": multi_hot,
            "image_size": (image.shape[0], image.shape[1]),
            "index": index,
        }
        return x, target

    def __repr__(self) -> str:
        return (f"EmbeddedShapes(split={self.split!r}, size={self.size}, seed={self.seed}, "
                f"normalized={self.normalized})")


def embedded_collate(batch: Sequence[Tuple[torch.Tensor, Dict[str, Any]]]
                     ) -> Tuple[torch.Tensor, List[Dict[str, Any]]]:
    """``collate_fn`` for a :class:`~torch.utils.data.DataLoader`.

    Returns the images stacked into one tensor and the targets as a list.
    """
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch]
