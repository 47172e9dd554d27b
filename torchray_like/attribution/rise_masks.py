r"""RISE's masks (Petsiuk, Das, Saenko, BMVC 2018): the random draws, the masks built from
them a batch at a time, and banks of masks made in advance.

Each mask is a binary grid of ``num_cells`` cells per side whose cells are kept with
probability ``p``, upsampled (linear / bilinear / trilinear by rank) to ``(num_cells + 1) ×
cell_size`` with ``cell_size = ceil(side / num_cells)``, and cropped at a random shift in
``[0, cell_size)`` per dimension.  The draws (cells and shifts, a few bytes per mask) are made
up front with a private :class:`torch.Generator`; :class:`MaskSampler` builds any slice of the
masks on demand, and a bank from :func:`generate_masks` with the same seed holds exactly the
masks :func:`~torchray_like.attribution.rise.rise` draws.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .arguments import check_not_meta, number_list, positive_int
from .seeding import GeneratorType, make_generator

__all__ = ["MaskSampler", "MaskBank", "generate_masks", "check_bank", "check_p", "check_size",
           "check_cells"]

# The random draws are made in blocks of this many masks: bounded temporary memory, and a stream
# of draws that does not depend on batch_size (so the masks do not either).
_DRAW_BLOCK = 4096


def check_p(p: Any) -> float:
    """``p``, the probability of keeping a cell, as a float in ``(0, 1]``."""
    if isinstance(p, bool) or not isinstance(p, Real) or not math.isfinite(float(p)):
        raise TypeError(f"p must be a number in (0, 1], got {p!r}")
    if not 0.0 < float(p) <= 1.0:
        raise ValueError(
            f"p (the probability of keeping a cell) must be in (0, 1], got {p!r}")
    return float(p)


def check_size(input_size: Any) -> Tuple[int, ...]:
    """``input_size`` as a tuple of 1 to 3 positive ints (torch order)."""
    if isinstance(input_size, (bool, Integral)):
        raise TypeError(
            f"input_size must be a tuple of spatial sizes in torch order — (L,), (H, W) or "
            f"(T, H, W) — got the int {input_size!r}; write (L,) for 1-D or (S, S) for 2-D")
    size = number_list(input_size)
    if size is None:
        raise TypeError(
            f"input_size must be a tuple (L,), (H, W) or (T, H, W), got "
            f"{type(input_size).__name__}")
    if not 1 <= len(size) <= 3 or not all(
            isinstance(s, Integral) and not isinstance(s, bool) and int(s) >= 1 for s in size):
        raise ValueError(
            f"input_size must hold 1 to 3 positive ints — (L,), (H, W) or (T, H, W) — got "
            f"{input_size!r}")
    return tuple(int(s) for s in size)


def check_cells(num_cells: Any, rank: int) -> Tuple[int, ...]:
    """``num_cells`` (one int, or one per spatial dimension) as ``rank`` positive ints."""
    cells = number_list(num_cells)
    if cells is not None:
        if len(cells) != rank:
            raise ValueError(
                f"num_cells must be an int or {rank} ints (one per spatial dimension), got "
                f"{num_cells!r}")
        return tuple(positive_int(s, "num_cells") for s in cells)
    return (positive_int(num_cells, "num_cells"),) * rank


class MaskSampler:
    """The random draws of ``num_masks`` RISE masks; :meth:`masks` builds any slice of them.

    Holds only the binary cells (``num_masks × prod(num_cells)`` booleans) and the shifts; the
    masks are upsampled on demand, so building them ``batch_size`` at a time or all at once
    gives the same values.
    """

    def __init__(self, num_masks: int, size: Tuple[int, ...], cells: Tuple[int, ...], p: float,
                 generator: torch.Generator) -> None:
        self.num_masks = num_masks
        self.size = size
        self.cells = cells
        self.p = p
        self.cell_size = tuple(-(-side // s) for side, s in zip(size, cells))
        self.up_size = tuple((s + 1) * c for s, c in zip(cells, self.cell_size))
        k, rank = math.prod(cells), len(size)
        grids: List[torch.Tensor] = []
        shifts: List[torch.Tensor] = []
        cs = torch.tensor(self.cell_size, dtype=torch.float64, device=generator.device)
        for start in range(0, num_masks, _DRAW_BLOCK):
            n = min(_DRAW_BLOCK, num_masks - start)
            # One uniform draw per cell (kept iff u < p) and per shift (floor(u · cell_size)).
            u = torch.rand(n, k + rank, generator=generator, device=generator.device,
                           dtype=torch.float64)
            grids.append(u[:, :k] < p)
            shift = (u[:, k:] * cs).floor().long()
            shifts.append(torch.minimum(shift, cs.long() - 1))
        self.grid = torch.cat(grids)
        self.shift = torch.cat(shifts)
        self._matrices: dict = {}

    def _matrix(self, d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(up_size[d], cells[d])`` weights of the linear upsampling along dimension ``d``:
        exactly what :func:`torch.nn.functional.interpolate` computes (``align_corners=False``),
        obtained by interpolating the identity."""
        key = (d, device, dtype)
        if key not in self._matrices:
            s = self.cells[d]
            eye = torch.eye(s, device=device, dtype=dtype).view(s, 1, s)
            up = F.interpolate(eye, size=self.up_size[d], mode="linear", align_corners=False)
            self._matrices[key] = up[:, 0].t().contiguous()
        return self._matrices[key]

    def masks(self, start: int, stop: int, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
        """Masks ``start:stop`` as a ``(stop - start, 1, *size)`` tensor."""
        n, rank = stop - start, len(self.size)
        # Work in at least single precision (half matmuls are not available everywhere).
        work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        out = self.grid[start:stop].to(device=device, dtype=work).view(n, *self.cells)
        shift = self.shift[start:stop].to(device)
        # Upsample-then-crop is separable: along each dimension only the rows of the upsampling
        # matrix that the crop keeps are needed, so each mask is a few small matrix products
        # and no upsampled grid is built.
        cells, sizes = "abc"[:rank], "xyz"[:rank]
        cur = list(cells)
        for d in reversed(range(rank)):
            rows = shift[:, d, None] + torch.arange(self.size[d], device=device)
            mat = self._matrix(d, device, work)[rows]  # (n, size[d], cells[d])
            src = "n" + "".join(cur)
            cur[d] = sizes[d]
            out = torch.einsum(f"{src},n{sizes[d]}{cells[d]}->n{''.join(cur)}", out, mat)
        # Interpolating ones can round one ulp above 1: keep masks in [0, 1] as documented.
        return out.clamp_(0.0, 1.0).unsqueeze(1).to(dtype)

    @property
    def num_cell_values(self) -> int:
        """Cells per grid (``prod(num_cells)``)."""
        return math.prod(self.cells)

    def cells_centered(self, start: int, stop: int, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
        """The binary grids of masks ``start:stop`` minus ``p``, ``(stop - start, cells)``:
        zero-mean regressors for the control variates of ``num_masks="auto"``."""
        return self.grid[start:stop].to(device=device, dtype=dtype) - self.p

    def cell_covariance(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``E[(z_k - p) M(λ)]`` for every cell ``k`` and pixel ``λ``, ``(cells, pixels)``,
        exactly (not sampled).

        A mask is ``Σ_k z_k W_k(λ; shift)`` with the upsampling weights ``W`` (a product over
        the dimensions) and independent cells ``z_k ~ Bernoulli(p)``, so the expectation is
        ``p (1 - p) E_shift[W_k(λ; shift)]``, and the average over the uniform shifts factorises
        into one average of the upsampling rows per dimension.
        """
        out: Optional[torch.Tensor] = None
        for d, (side, cs) in enumerate(zip(self.size, self.cell_size)):
            mat = self._matrix(d, device, dtype)                       # (up, cells[d])
            avg = torch.stack([mat[s:s + side] for s in range(cs)]).mean(0).t()  # (cells, side)
            out = avg if out is None else (out[:, None, :, None] * avg[None, :, None, :]).flatten(
                0, 1).flatten(1)
        assert out is not None
        return out * (self.p * (1.0 - self.p))


def generate_masks(num_masks: int, input_size: Sequence[int], num_cells: Union[int,
                   Sequence[int]] = 7, p: float = 0.5, generator: GeneratorType = None,
                   device: Union[str, torch.device, None] = None,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A bank of RISE masks (Petsiuk et al. 2018), reusable across calls of :func:`rise`.

    Parameters
    ----------
    num_masks : int
        Number of masks.
    input_size : tuple of int
        Spatial size in torch order: ``(L,)``, ``(H, W)`` or ``(T, H, W)``.
    num_cells : int or tuple of int
        Cells per side of the binary grid (the paper's ``s``, 7); one per dimension allowed
        (e.g. fewer cells along time).
    p : float
        Probability of keeping a cell, in ``(0, 1]``.
    generator : torch.Generator, int or None
        Source of randomness: a generator (advanced by the call), an int seed, or ``None`` for a
        seed derived from the global RNG state, which is not advanced (so the bank is
        reproducible under :func:`torch.manual_seed`).  The global RNG is never used.
    device, dtype
        Where and in which floating type to build the bank (default: CPU, the default dtype).

    Returns
    -------
    torch.Tensor
        ``(num_masks, 1, *input_size)`` masks with values in ``[0, 1]`` and expectation ``p`` at
        every pixel.  ``rise(..., masks=bank, p=p)`` with this bank gives exactly what
        ``rise(..., num_masks=num_masks, num_cells=num_cells, p=p, generator=<same seed>)``
        gives.  Memory: ``num_masks × prod(input_size)`` values (8000 masks at 224² in float32
        take 1.6 GB) — :func:`rise` without a bank never holds more than ``batch_size`` masks.
    """
    num_masks = positive_int(num_masks, "num_masks")
    size = check_size(input_size)
    cells = check_cells(num_cells, len(size))
    p = check_p(p)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device("cpu" if device is None else device)
    sampler = MaskSampler(num_masks, size, cells, p, make_generator(generator))
    return sampler.masks(0, num_masks, device, dtype)


class MaskBank:
    """Masks ``start:stop`` of a bank given by the caller, on the input's device."""

    def __init__(self, masks: torch.Tensor) -> None:
        self.bank = masks

    def masks(self, start: int, stop: int, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
        """Masks ``start:stop`` as a ``(stop - start, 1, *size)`` tensor."""
        return self.bank[start:stop].to(device=device, dtype=dtype)


def check_bank(masks: Any, input: torch.Tensor, num_masks: Optional[int], p: float,
               check_mean: bool) -> int:
    """Check a bank of masks against the input (and its mean against ``p`` when
    ``check_mean``); return the number of masks to use (``num_masks``, or the whole bank)."""
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a tensor from generate_masks, got {type(masks).__name__}")
    if not masks.is_floating_point():
        raise TypeError(f"masks must be a floating-point tensor, got dtype {masks.dtype}")
    check_not_meta(masks, "masks")  # (before: PyTorch's "item() ... on meta tensors")
    want = (1,) + tuple(input.shape[2:])
    if masks.dim() != input.dim() or tuple(masks.shape[1:]) != want or masks.shape[0] == 0:
        raise ValueError(
            f"masks must have shape (num_masks, 1, *spatial) = (M, {', '.join(map(str, want))}) "
            f"to match the input {tuple(input.shape)}, got {tuple(masks.shape)}; build the bank "
            f"with generate_masks(M, {tuple(input.shape[2:])})")
    available = masks.shape[0]
    if num_masks is None:
        num_masks = available
    elif num_masks > available:
        raise ValueError(
            f"num_masks={num_masks} but the masks bank holds only {available} masks")
    mean = float(masks[:num_masks].mean())  # in the bank's dtype: no copy of a large bank
    if not math.isfinite(mean):
        raise ValueError("masks contain non-finite values (nan or inf)")
    # The paper's normalisation divides by p, the masks' expectation: a bank drawn with another
    # p would silently scale every map.  The tolerance leaves room for few, coarse masks.
    if check_mean and abs(mean - p) > 0.1 + 2.0 / math.sqrt(num_masks):
        raise ValueError(
            f"the masks have mean value {mean:.3f} but p={p}: pass the p the bank was generated "
            f"with (the maps are divided by p)")
    return num_masks
