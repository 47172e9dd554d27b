r"""The stopping rule of RISE's ``num_masks="auto"``: control variates and a correlation estimate.

RISE's map is a Monte-Carlo mean, :math:`S = \frac{u}{N} \sum_i f_i M_i` (``u = 1/p`` for the
paper's normalisation, 1 for TorchRay's), with :math:`f_i` the score under mask :math:`M_i`
(Petsiuk, Das, Saenko, BMVC 2018).  When RISE stops early it returns a lower-variance estimate
of the same expectation, and stops once that estimate is (by its own error estimate) close to
its limit.

**Control variates** (regression estimator; e.g. Owen, *Monte Carlo theory, methods and
examples*, 2013, ch. 8.9).  Each mask is built from a grid of independent cells
:math:`z_{ik} \sim \text{Bernoulli}(p)`; the score is regressed on them by least squares,
:math:`f_i \approx b_0 + \sum_k b_k (z_{ik} - p)`, and

.. math::

    \hat S = u \Big( b_0\, \bar m + \sum_k b_k\, C_k + \frac{1}{N} \sum_i r_i M_i \Big),
    \qquad r_i = f_i - b_0 - \sum_k b_k (z_{ik} - p),

with :math:`C_k = E[(z_k - p) M]`, known exactly from the mask construction, and
:math:`\bar m = E[M] = p`.  Since :math:`E[f M] = b_0 p + \sum_k b_k C_k + E[r M]` for any
fixed :math:`b`, :math:`\hat S` has the plain map's expectation (up to ``O(1/N)`` from fitting
``b`` on the same masks), and its Monte-Carlo noise is that of the residuals :math:`r_i`
only: the part of the score that is linear in the cells, and the mask-coverage noise
:math:`b_0 (\frac{1}{N} \sum_i M_i - p)` — the largest part of the plain map's noise — are
removed.  With a bank of masks (no cells known) the regression has the intercept only, and
:math:`\bar m` is the bank's mean value.  Fewer than ``4 (cells + 1)`` masks: intercept only.

**The stopping statistic.**  Correlation ignores scale and offset, so what matters is the
spatial variance of the noise against that of the map.  With :math:`u_i` the residual term
:math:`r_i M_i` minus its spatial mean, the noise's spatial variance is estimated by
:math:`\hat\nu = \frac{\sum_i \lVert u_i - \bar u \rVert^2}{(N - d) N P}` (``P`` pixels, ``d``
fitted coefficients), computed from running sums (:math:`\lVert u_i \rVert^2 = r_i^2 q_i` with
:math:`q_i` the mask's centred sum of squares); the map's spatial variance :math:`s^2` is
signal plus noise, so the correlation of the map with its limit is estimated by
:math:`\hat\rho = \sqrt{1 - \hat\nu / s^2}`.  Assumptions: the masks are independent draws
(true for :func:`~.rise_masks.generate_masks` and for RISE's own stream), ``N`` is large enough
for the running sums to estimate the variances (the rule never stops before 256 masks), and
the noise is treated as uncorrelated with the signal (Pearson correlation of a map plus
independent noise).  It is an estimate: a map can stop just above the threshold by chance.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["ControlVariates", "RELEVANT_SIGNAL"]

#: With several maps per image (``target=None``), only the maps whose estimated signal (spatial
#: standard deviation of the converged map) is at least this share of the image's strongest
#: map are waited for: near-flat maps of classes the image gives no evidence for would need far
#: more masks and are rarely looked at.
RELEVANT_SIGNAL = 0.5
# Regress on the cells only with at least this many masks per coefficient.
_MASKS_PER_COEFFICIENT = 4


class ControlVariates:
    """Running sums for the regression estimator and its noise, folded with the maps' sums.

    ``rows`` maps (images × classes, ``per_image`` classes each) of ``pixels`` values; ``cell_cov``
    is :meth:`~.rise_masks.MaskSampler.cell_covariance` (``None`` for a bank: intercept only).
    Small sums are kept in float64; the ``(coefficients, pixels)`` sums in the maps' dtype.
    """

    def __init__(self, rows: int, per_image: int, pixels: int, cell_cov: Optional[torch.Tensor],
                 mean_mask: Optional[float], dtype: torch.dtype, device: torch.device) -> None:
        self.rows, self.per_image, self.pixels = rows, per_image, pixels
        self.cell_cov = cell_cov
        self.mean_mask = mean_mask                    # p for drawn masks; None: the bank's mean
        d = 1 + (0 if cell_cov is None else cell_cov.shape[0])
        self.d = d
        self.xm = torch.zeros(d, pixels, dtype=dtype, device=device)   # Σ x_i M_i

        def small(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        self.gram = small(d, d)                                        # Σ x_i x_iᵀ
        self.xf = small(d, rows)                                       # Σ x_i f_i
        self.qxx = small(d, d)                                         # Σ q_i x_i x_iᵀ
        self.qxf = small(d, rows)                                      # Σ q_i x_i f_i
        self.qff = small(rows)                                         # Σ q_i f_i²
        self.n = 0
        self.coef: Optional[torch.Tensor] = None

    def add(self, scores: torch.Tensor, masks: torch.Tensor,
            cells: Optional[torch.Tensor]) -> None:
        """Fold ``scores (rows, n)``, ``masks (n, pixels)`` and ``cells (n, k) - p``."""
        n = masks.shape[0]
        ones = torch.ones(n, 1, dtype=masks.dtype, device=masks.device)
        x = ones if cells is None else torch.cat([ones, cells.to(masks.dtype)], 1)
        self.xm.addmm_(x.t(), masks)
        # q_i: the centred sum of squares of mask i (the spatial spread of its term r_i M_i).
        q = (masks - masks.mean(1, keepdim=True)).square().sum(1).double()
        x64, f64 = x.double(), scores.double().t()                    # (n, d), (n, rows)
        self.gram += x64.t() @ x64
        self.xf += x64.t() @ f64
        qx = x64 * q[:, None]
        self.qxx += qx.t() @ x64
        self.qxf += qx.t() @ f64
        self.qff += q @ f64.square()
        self.n += n

    def _fit(self) -> Tuple[torch.Tensor, int]:
        """Least-squares coefficients ``(d_used, rows)``: on the cells once there are enough
        masks for them, else the intercept (the mean score) only."""
        d = self.d if self.n >= _MASKS_PER_COEFFICIENT * self.d else 1
        # pinv: a singular Gram matrix (p = 1, a cell never drawn) gives the minimum-norm fit.
        coef = torch.linalg.pinv(self.gram[:d, :d]) @ self.xf[:d]
        return coef, d

    def estimate(self, sums: torch.Tensor, out: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """Write ``W = b·C + (1/N) Σ r_i M_i`` into ``out`` (``rows × pixels``, the map up to its
        unit and a constant) from the maps' running sums ``Σ f_i M_i``; return the largest
        ``1 - ρ̂`` over the maps that count and ``ρ̂`` per map (see the module notes)."""
        n = self.n
        coef, d = self._fit()
        self.coef = coef
        c = coef.to(out.dtype)
        # Σ r_i M_i = Σ f_i M_i - bᵀ Σ x_i M_i.
        torch.addmm(sums, c.t(), self.xm[:d], alpha=-1.0, out=out)
        resid_var = out.var(1, unbiased=False).double() / n ** 2       # spatial var of R / N
        r2q = (self.qff - 2.0 * (coef * self.qxf[:d]).sum(0)
               + (coef * (self.qxx[:d, :d] @ coef)).sum(0))
        noise = ((r2q - n * self.pixels * resid_var) / (max(n - d, 1) * n * self.pixels)
                 ).clamp(min=0.0)
        out.div_(n)
        if d > 1:
            assert self.cell_cov is not None
            out.addmm_(c[1:].t(), self.cell_cov)
        total = out.var(1, unbiased=False).double()
        flat = total <= 0
        rho2 = torch.where(flat, (noise <= 0).double(), 1.0 - noise / total.clamp(min=1e-300))
        rho = rho2.clamp(0.0, 1.0).sqrt()
        signal = (total - noise).clamp(min=0.0).sqrt().view(-1, self.per_image)
        counts = signal >= RELEVANT_SIGNAL * signal.amax(1, keepdim=True)
        worst = float((1.0 - rho.view(-1, self.per_image))[counts].max())
        return worst, rho

    def finish(self, out: torch.Tensor, unit: float) -> torch.Tensor:
        """The estimate ``Ŝ = u (b_0 m̄ + W)`` in place, from :meth:`estimate`'s ``out``."""
        assert self.coef is not None
        mean = self.mean_mask
        if mean is None:                                # a bank: its mean value over the pixels
            mean = float(self.xm[0].double().sum()) / (self.n * self.pixels)
        out.add_((self.coef[0] * mean).to(out.dtype)[:, None]).mul_(unit)
        return out
