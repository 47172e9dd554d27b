r"""The embedded data set's shapes: signed distances (negative inside) of the class shapes and
the distractors, evaluated on local pixel grids (:func:`shape_sdf`, :func:`distractor_sdf`).

Used by :mod:`torchray_like.benchmark.embedded_data` to draw its images; pure functions of the
pixel grid, the radius, the angle and the random generator (draws in a fixed order, so the data
set is reproducible).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

__all__ = ["polygon_sdf", "regular", "rotate", "shape_sdf", "distractor_sdf"]


def polygon_sdf(px: np.ndarray, py: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Signed distance from points to a closed polygon (even-odd inside test)."""
    dist = np.full(px.shape, np.inf)
    inside = np.zeros(px.shape, dtype=bool)
    n = len(vx)
    for i in range(n):
        ax, ay, bx, by = vx[i], vy[i], vx[(i + 1) % n], vy[(i + 1) % n]
        ex, ey = bx - ax, by - ay
        wx, wy = px - ax, py - ay
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dx, dy = wx - t * ex, wy - t * ey
        np.minimum(dist, np.sqrt(dx * dx + dy * dy), out=dist)
        # crossing number: the edge straddles the horizontal line through the point
        straddle = (ay > py) != (by > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xcross = ax + (py - ay) * ex / np.where(ey == 0, 1.0, ey)
        inside ^= straddle & (px < xcross)
    return np.where(inside, -dist, dist)


def regular(n: int, radius: float, angle: float, inner: Optional[float] = None
             ) -> Tuple[np.ndarray, np.ndarray]:
    """Vertices of a regular polygon (or of a star when ``inner`` is given)."""
    if inner is None:
        t = angle + 2 * np.pi * np.arange(n) / n
        return radius * np.cos(t), radius * np.sin(t)
    t = angle + np.pi * np.arange(2 * n) / n
    r = np.where(np.arange(2 * n) % 2 == 0, radius, inner)
    return r * np.cos(t), r * np.sin(t)


def rotate(vx: np.ndarray, vy: np.ndarray, angle: float) -> Tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return c * vx - s * vy, s * vx + c * vy


def shape_sdf(kind: str, px: np.ndarray, py: np.ndarray, r: float, angle: float,
               rng: np.random.Generator) -> np.ndarray:
    """Signed distance of the shape ``kind`` of radius ``r`` centred at the origin."""
    if kind == "disc":
        return np.sqrt(px * px + py * py) - r
    if kind == "ring":
        width = r * rng.uniform(0.28, 0.42)
        return np.abs(np.sqrt(px * px + py * py) - (r - width / 2)) - width / 2
    if kind == "square":
        return polygon_sdf(px, py, *regular(4, r * 1.1, angle))
    if kind == "hexagon":
        return polygon_sdf(px, py, *regular(6, r, angle))
    if kind == "triangle":
        return polygon_sdf(px, py, *regular(3, r * 1.1, angle))
    if kind == "star":
        return polygon_sdf(px, py, *regular(5, r * 1.1, angle, inner=r * 0.45))
    if kind == "cross":
        a = r * rng.uniform(0.28, 0.36)     # half arm width
        vx = np.array([a, a, r, r, a, a, -a, -a, -r, -r, -a, -a])
        vy = np.array([r, a, a, -a, -a, -r, -r, -a, -a, a, a, r])
        return polygon_sdf(px, py, *rotate(vx, vy, angle))
    return distractor_sdf(kind, px, py, r, angle, rng)


def distractor_sdf(kind: str, px: np.ndarray, py: np.ndarray, r: float, angle: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Signed distance of the distractor ``kind`` (see :func:`shape_sdf`)."""
    if kind == "ellipse":
        aspect = rng.uniform(1.9, 2.8)
        a, b = r, r / aspect
        qx, qy = rotate(px, py, -angle)
        k = np.sqrt((qx / a) ** 2 + (qy / b) ** 2)
        return (k - 1.0) * b        # approximate, exact enough for a one-pixel edge
    if kind == "bar":
        aspect = rng.uniform(3.0, 6.0)
        vx = np.array([r, -r, -r, r])
        vy = np.array([r, r, -r, -r]) / aspect
        return polygon_sdf(px, py, *rotate(vx, vy, angle))
    if kind == "crescent":
        d = np.sqrt(px * px + py * py) - r
        ox, oy = 0.5 * r * math.cos(angle), 0.5 * r * math.sin(angle)
        d2 = np.sqrt((px - ox) ** 2 + (py - oy) ** 2) - 0.85 * r
        return np.maximum(d, -d2)
    if kind == "half_disc":
        d = np.sqrt(px * px + py * py) - r
        return np.maximum(d, px * math.cos(angle) + py * math.sin(angle))
    if kind == "ell":
        w = r * 0.45
        vx = np.array([-r, r, r, -r + w, -r + w, -r])
        vy = np.array([-r, -r, -r + w, -r + w, r, r])
        return polygon_sdf(px, py, *rotate(vx, vy, angle))
    if kind == "peanut":       # two overlapping discs along a random axis
        rr = r * rng.uniform(0.45, 0.6)
        ox, oy = (r - rr) * math.cos(angle), (r - rr) * math.sin(angle)
        d1 = np.sqrt((px - ox) ** 2 + (py - oy) ** 2) - rr
        d2 = np.sqrt((px + ox) ** 2 + (py + oy) ** 2) - rr
        return np.minimum(d1, d2)
    if kind == "arc":          # a broken ring (a gap of 80 to 140 degrees)
        width = r * rng.uniform(0.28, 0.42)
        rad = np.sqrt(px * px + py * py)
        ring = np.abs(rad - (r - width / 2)) - width / 2
        gap = math.radians(rng.uniform(80, 140))
        off = np.abs(np.angle(np.exp(1j * (np.arctan2(py, px) - angle))))
        return np.maximum(ring, (gap / 2 - off) * rad)
    if kind == "tee":
        w = r * rng.uniform(0.4, 0.55)
        vx = np.array([-r, r, r, w / 2, w / 2, -w / 2, -w / 2, -r])
        vy = np.array([-r, -r, -r + w, -r + w, r, r, -r + w, -r + w])
        return polygon_sdf(px, py, *rotate(vx, vy, angle))
    raise AssertionError(kind)
