r"""Eigen-CAM.

Muhammad, Yeasin, "Eigen-CAM: class activation map using principal components", IJCNN 2020
(arXiv 2008.00299).  The map is the projection of a layer's activations onto their first
principal component: with ``A`` of shape ``(N, K, *spatial)`` seen, per sample, as a matrix
``X`` of ``P`` positions × ``K`` channels, centred per channel (``X - mean_u X``),

.. math::

    X = U \Sigma V^\top, \qquad p(u) = X(u)\, v_1, \qquad M = \operatorname{ReLU}(p),

with ``v_1`` the first right singular vector.  The map uses no gradient and does not depend on
the target (it is class-agnostic); a target is still taken, as by every method here, because
the function shares Grad-CAM's forward pass (and its checks) and runs inside
:func:`~torchray_like.attribution.explain.explain` with the other CAMs.

The sign of a singular vector is arbitrary (LAPACK returns either); here it is fixed so that
the loadings of ``v_1`` sum to a positive number — equivalently, the projection correlates
positively with the channel-mean activation map — so the map highlights what the layer's
channels agree on.  pytorch-grad-cam 1.5.7's ``EigenCAM`` keeps whatever sign its SVD returns:
after the same normalisation its maps equal ours or ``ReLU(-p)``, sample by sample
(``tests/test_cam_family.py``; TorchCAM 0.5 has no Eigen-CAM).  A layer whose activations do
not vary over space has no principal direction: its map is zero.
"""

from __future__ import annotations

from typing import Optional

import torch

from .driver import all_finite
from .grad_cam_plus_plus import check_cam_reading, gradient_cam_method

__all__ = ["eigen_cam", "EIGEN_CAM", "eigen_cam_map", "eigen_cam_projection",
           "first_right_singular_vector", "gradient_to_eigen_cam_saliency"]


def eigen_cam_projection(activation: torch.Tensor) -> torch.Tensor:
    """The signed projection ``p`` of each sample's centred activations onto their first
    principal component, sign fixed as the module docstring says.

    Parameters
    ----------
    activation : torch.Tensor
        ``(N, K, *spatial)``.

    Returns
    -------
    torch.Tensor
        ``(N, 1, *spatial)``, in the activation's dtype (computed in float64).

    Raises
    ------
    ValueError
        For an activation that is not ``(N, K, *spatial)`` or not finite.
    """
    check_cam_reading("Eigen-CAM", activation, activation)
    if not all_finite(activation) and not bool(torch.isfinite(activation).all()):
        # LAPACK's SVD would fail to converge (a RuntimeError) or return NaN.
        raise ValueError("Eigen-CAM: the activation holds NaN or infinite values; check the "
                         "model on this input (or read another layer)")
    n, k = activation.shape[:2]
    # In float64: the leading singular vector of float32 data is sensitive to rounding when
    # the first two singular values are close (a few positions, many channels).
    x = activation.detach().reshape(n, k, -1).transpose(1, 2).to(torch.float64)  # (N, P, K)
    x = x - x.mean(dim=1, keepdim=True)
    v1 = first_right_singular_vector(x)                                  # (N, K)
    # Fix the sign: loadings summing to a positive number; on a tie, the largest loading > 0.
    sign = torch.sign(v1.sum(dim=1))
    largest = v1.gather(1, v1.abs().argmax(dim=1, keepdim=True))[:, 0]
    sign = torch.where(sign == 0, torch.sign(largest), sign)
    projection = torch.bmm(x, (v1 * sign[:, None]).unsqueeze(2))         # (N, P, 1)
    return projection.transpose(1, 2).reshape((n, 1) + tuple(activation.shape[2:])).to(
        activation.dtype)


def first_right_singular_vector(x: torch.Tensor) -> torch.Tensor:
    """``v_1`` of each ``(P, K)`` matrix of the batch ``x`` (``(N, P, K)``, float64), up to sign.

    The top eigenvector of the smaller Gram matrix: ``XᵀX`` (``K × K``), or ``XXᵀ`` (``P × P``)
    whose top eigenvector ``u_1`` gives ``v_1 = Xᵀu_1 / ‖Xᵀu_1‖``.  The same vector as the
    SVD's (to 1e-14 in float64 on random data: its rounding error grows like the SVD's, as
    ``σ_1 / (σ_1 − σ_2)``), 2–8× faster on a CPU for a layer of 64–2048 channels (a symmetric
    eigensolver of the smaller side instead of a bidiagonalisation of both).  A matrix of
    zeros (no spatial variation) gives some unit vector; its projection is zero either way.
    """
    p, k = x.shape[1:]
    if k <= p:
        return torch.linalg.eigh(x.transpose(1, 2) @ x)[1][:, :, -1]
    u1 = torch.linalg.eigh(x @ x.transpose(1, 2))[1][:, :, -1:]           # (N, P, 1)
    v1 = (x.transpose(1, 2) @ u1)[..., 0]                                # (N, K)
    return v1 / v1.norm(dim=1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)


def eigen_cam_map(activation: torch.Tensor,
                  gradient: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eigen-CAM map ``ReLU(p)`` (:func:`eigen_cam_projection`), ``(N, 1, *spatial)``.

    ``gradient`` is accepted (the layer-map signature of the CAM family) and not used.
    """
    if gradient is not None:
        check_cam_reading("Eigen-CAM", activation, gradient)
    return eigen_cam_projection(activation).clamp_(min=0)


def gradient_to_eigen_cam_saliency(x: torch.Tensor) -> torch.Tensor:
    """Eigen-CAM map of a layer's activation ``x`` (its ``.grad`` is not used)."""
    return eigen_cam_map(x.detach())


#: The description: Grad-CAM's reading, of which only the activation is used (a call of its
#: own runs the forward pass only; in ``explain`` it shares the other CAMs' pass).
EIGEN_CAM = gradient_cam_method("eigen_cam", __name__, "Eigen-CAM saliency map (Muhammad & "
                                "Yeasin 2020).", eigen_cam_map, gradient_to_eigen_cam_saliency,
                                gradient=False)

eigen_cam = EIGEN_CAM.function()
