r"""The math of Delta-LoRA, as small pure functions.

Algorithm 1 of Zi et al. (2023) moves the frozen weight after each optimizer step :math:`t > K`:

.. math::

    W \leftarrow W + \lambda s \,(B' A' - B A)
      = W + \lambda s \, U V, \qquad U = [B' - B,\ B] \in \mathbb{R}^{d\times 2r},\quad
      V = \begin{bmatrix} A' \\ A' - A \end{bmatrix} \in \mathbb{R}^{2r\times k}

since :math:`(B'-B)A' + B(A'-A) = B'A' - BA`. So the update is one rank-:math:`2r` GEMM added in place
(``W.addmm_(U, V)``) and the dense product :math:`BA` is never formed. This factorization of the delta
(rather than :math:`[B', B]\,[A'; -A]`) keeps every term of the size of the delta itself, so neither the
GEMM nor the norm below cancel large terms. It is NOT the :math:`(B'-B)(A'-A)` of some implementations.
Where the weight is stored transposed (``Conv1D`` with ``fan_in_fan_out``, ``nn.Embedding``) the same
update is ``W.addmm_(V^T, U^T)``.

For bfloat16/float16 weights a per-step delta is mostly below half an ulp of W, so a plain
add drops it. ``add_low_rank_`` then computes the sum in float32, a block of rows at a
time (never a W-sized temporary), and rounds back stochastically: each element goes to one
of its two neighbouring representable values with probabilities that make the expectation
exact, so the accumulated change of W is unbiased.

The factored mode adds the move to the output instead of W. With ``g = 1`` once anchored (0 before), a LoRA
layer plus the move is ``s (1 + lambda g) B A x - lambda s B_K A_K x``: one ``B A x``. Its gradients for A and B
must stay LoRA's (``s`` times), as in the paper where only the LoRA product is trained, while x must get the
whole layer's gradient: the layer computes ``[(1 + lambda g) s B', -lambda s B_K] [A'; A_K] x`` (one rank-2r
product) with ``A' = scale_grad(A, 1 / (1 + lambda g))`` and likewise ``B'``: ``scale_grad`` is the identity
forward and scales the gradient, so A and B get ``s`` times their LoRA gradient and x the whole layer's.
"""

from __future__ import annotations

from typing import Literal

import torch

Rounding = Literal["stochastic", "nearest"]

# Elements per float32 block in the low-precision path (4 MiB): large enough for an efficient
# GEMM, small next to any real weight.
BLOCK_ELEMENTS = 1 << 20


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        scale = ctx.scale
        return grad * (scale.to(grad.dtype) if isinstance(scale, torch.Tensor) else scale), None


def scale_grad(t: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``t`` itself in the forward pass; its gradient is multiplied by ``scale`` in the backward pass."""
    return _ScaleGrad.apply(t, scale)


_GENERATORS: dict[torch.device, torch.Generator] = {}


def default_generator(device: torch.device) -> torch.Generator:
    """A per-device generator for stochastic rounding outside an updater, so the global RNG is never consumed."""
    if device not in _GENERATORS:
        _GENERATORS[device] = torch.Generator(device=device).manual_seed(0)
    return _GENERATORS[device]


def delta_factors(
    a_new: torch.Tensor, b_new: torch.Tensor, a_old: torch.Tensor, b_old: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(U, V)`` with ``U @ V == B'A' - BA``: ``U = [B' - B, B]`` (d x 2r), ``V = [A'; A' - A]`` (2r x k)."""
    return torch.cat([b_new - b_old, b_old], dim=1), torch.cat([a_new, a_new - a_old], dim=0)


def low_rank_frobenius_sq(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``||U V||_F^2`` from the small Gram matrices: ``sum((U^T U) * (V V^T))``, no d x k product."""
    u32, v32 = u.float(), v.float()
    return ((u32.T @ u32) * (v32 @ v32.T)).sum()


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round float32 ``x`` to ``dtype`` stochastically and without bias: ``E[result] == x``.

    ``x`` lies between its nearest ``dtype`` value ``y`` and the next value ``z`` towards ``x``;
    return ``z`` with probability ``(x - y) / (z - y)``, else ``y``.
    """
    if dtype == torch.bfloat16:
        return _stochastic_round_bf16(x, generator)
    nearest = x.to(dtype)
    residual = x - nearest.float()
    towards = torch.where(residual > 0, torch.inf, -torch.inf).to(dtype)
    neighbour = torch.nextafter(nearest, towards)
    probability = residual / (neighbour.float() - nearest.float())  # in [0, 1/2]; NaN only at +-inf
    draw = torch.rand(x.shape, generator=generator, device=x.device)
    return torch.where(draw < probability, neighbour, nearest)


def _stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """bfloat16 is float32 without its low 16 bits: add uniform noise to those bits, then cut them off.

    The magnitude rounds up with probability (dropped bits) / 2^16, which is unbiased; the sign bit is not touched
    (IEEE floats are sign-magnitude), and infinities stay infinite since their low bits are zero.
    """
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=generator, device=x.device)
    bits = (x.contiguous().view(torch.int32) + noise).bitwise_and_(-65536)
    return bits.view(torch.float32).to(torch.bfloat16)


def add_low_rank_(
    weight: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    alpha: float,
    *,
    transposed: bool = False,
    rounding: Rounding = "stochastic",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """In place: ``weight += alpha * U @ V`` (or ``alpha * (U @ V)^T`` if ``transposed``).

    float32/float64 weights take one fused ``addmm_``. Lower-precision weights are updated a block of
    rows at a time: the block is summed in float32 and rounded back with ``rounding``.
    """
    left, right = (v.T, u.T) if transposed else (u, v)
    if weight.dtype in (torch.float32, torch.float64):
        if left.dtype != weight.dtype or right.dtype != weight.dtype:
            left, right = left.to(weight.dtype), right.to(weight.dtype)
        return weight.addmm_(left, right, alpha=alpha)
    if not weight.is_floating_point():
        raise TypeError(f"cannot update a {weight.dtype} weight in place.")
    left, right = left.float(), right.float()
    rows = max(1, BLOCK_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        block = weight[start : start + rows]
        exact = torch.addmm(block.float(), left[start : start + rows], right, alpha=alpha)
        block.copy_(stochastic_round(exact, weight.dtype, generator) if rounding == "stochastic" else exact)
    return weight
