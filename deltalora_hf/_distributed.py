r"""What Delta-LoRA needs to know about partitioned parameters: DeepSpeed ZeRO-3 and torch ``DTensor`` (FSDP2).

The rest of the package calls only these functions; DeepSpeed is imported lazily, when a ZeRO-3 parameter
(one with a ``ds_id``) is seen, so it is never needed otherwise.

* :func:`gathered` / :func:`full_values`: the whole, readable value of a factor (to record anchors, to cache
  the factors of the in-place update, to log norms, to export).
* :func:`used_in_forward`: a factor read by a layer's own ``forward`` outside the forward of the submodule that
  owns it (PEFT's embedding factors); ZeRO-3 is told to gather it with that layer.
* :func:`check_writable_in_place` and :func:`add_low_rank_`: the in-place W update. Under ZeRO-3 each rank owns
  one contiguous slice of the flattened W (``param.ds_tensor``); the update of that slice needs only the matching
  elements of the rank-2r product, so every rank updates its own slice exactly, with no communication:

  .. math::

      W_{\text{flat}}[s:e] \mathrel{+}= \alpha\,\operatorname{vec}(U_{[i_0:i_1]} V)[s - i_0 k : e - i_0 k],
      \qquad i_0 = \lfloor s/k \rfloor,\ i_1 = \lceil e/k \rceil

  (k columns of W as stored). A ``DTensor`` (FSDP2) or quantized W cannot be written this way and is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import functional


def is_zero3(t: torch.Tensor) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (it has a ``ds_id``; its ``data`` is empty unless gathered)."""
    return hasattr(t, "ds_id")


def is_dtensor(t: torch.Tensor) -> bool:
    """A torch ``DTensor`` (e.g. a parameter sharded by FSDP2)."""
    return hasattr(t, "full_tensor")


def is_partitioned(t: torch.Tensor) -> bool:
    """Whether ``t`` is split across ranks (ZeRO-3 or DTensor), so that no rank holds its whole value by default."""
    return is_zero3(t) or is_dtensor(t)


@contextlib.contextmanager
def gathered(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Read-only full values of ``tensors`` inside the ``with`` block.

    ZeRO-3 parameters are all-gathered (``deepspeed.zero.GatheredParameters(modifier_rank=None)``: a collective,
    so every rank must enter the block, in the same order) and partitioned again on exit; a DTensor gives its
    ``full_tensor()``; anything else is returned as is. Do not modify the values: copy what must outlive the block.
    """
    zero3 = [t for t in tensors if is_zero3(t)]
    if not zero3:
        yield tuple(t.full_tensor() if is_dtensor(t) else t for t in tensors)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
        yield tuple(t.full_tensor() if is_dtensor(t) else t for t in tensors)


def full_values(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Like :func:`gathered` without a block: tensors that are not partitioned are returned as they are (no copy),
    partitioned ones as detached full copies."""
    if not any(is_partitioned(t) for t in tensors):
        return tensors
    with gathered(*tensors) as values:
        return tuple(v.detach().clone() if is_partitioned(t) else v for t, v in zip(tensors, values))


def used_in_forward(module: torch.nn.Module, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``params`` with their full values, for use in ``module.forward`` although another submodule owns them.

    ZeRO-3 gathers a parameter only around its owner's forward; here each one is registered as an external
    parameter of ``module`` (``deepspeed.zero.register_external_parameter``, once), so that DeepSpeed fetches and
    releases it with ``module`` in the forward and backward passes from now on, and gathered now if it is not
    available (the first time). Other tensors are returned unchanged.
    """
    zero3 = [p for p in params if is_zero3(p)]
    if zero3:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus, register_external_parameter

        for param in zero3:
            if id(param) not in getattr(module, "_external_params", {}):
                register_external_parameter(module, param)
        missing = [p for p in zero3 if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if missing:
            missing[0].all_gather(param_list=missing)
    return params


def write_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """In place: ``param = value`` where ``value`` is the whole (same on every rank) value of ``param``.

    A ZeRO-3 parameter is gathered, written and partitioned again (a collective: every rank must call it, in the
    same order); a DTensor takes its own shard of ``value``; anything else is a plain ``copy_``.
    """
    if is_zero3(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value)
        return
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        param.copy_(distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements))
        return
    param.copy_(value)


def is_main_process() -> bool:
    """Rank 0 of an initialized ``torch.distributed`` job, or a process that is not part of one."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def check_writable_in_place(weight: torch.Tensor, name: str) -> None:
    """Raise a ``RuntimeError`` unless :func:`add_low_rank_` can update ``weight`` in place.

    Plain tensors and ZeRO-3 partitions (updated slice by slice) can be written; a DTensor (FSDP2), a quantized
    weight, or a ZeRO-3 weight in a layout this module does not handle (NVMe offload, hpZ secondary partitions,
    quantized frozen weights) cannot.
    """
    if is_zero3(weight):
        reason = _zero3_layout_problem(weight)
        if reason is None:
            return
        raise RuntimeError(
            f"Delta-LoRA cannot update the ZeRO-3 base weight of {name} in place: {reason}. Use "
            "DeltaLoraConfig(base_update='factored'), which never writes W, or drop that ZeRO-3 option."
        )
    if type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point:
        raise RuntimeError(
            f"Delta-LoRA cannot update the {type(weight.data).__name__} base weight of {name} in place (sharded "
            "by FSDP, or quantized). Use DeltaLoraConfig(base_update='factored'), which never writes W."
        )


def _zero3_layout_problem(weight: torch.Tensor) -> str | None:
    part = weight.ds_tensor
    if getattr(weight, "ds_secondary_tensor", None) is not None:
        return "it has a hierarchical (hpZ, zero_hpz_partition_size > 1) secondary partition"
    if getattr(part, "final_location", None) == "nvme":  # OffloadDeviceEnum is a str enum
        return "its partition lives on NVMe (offload_param to nvme)"
    if hasattr(part, "ds_quant_scale"):
        return "its partition is quantized (zero_quantized_nontrainable_weights)"
    if len(weight.ds_shape) != 2 or not weight.dtype.is_floating_point:
        return f"it is not a 2-D floating-point matrix ({tuple(weight.ds_shape)}, {weight.dtype})"
    return None


def add_low_rank_(
    weight: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    alpha: float,
    *,
    transposed: bool = False,
    rounding: functional.Rounding = "stochastic",
    generator: torch.Generator | None = None,
) -> None:
    """``weight += alpha * U @ V`` (``(U @ V)^T`` if ``transposed``): :func:`deltalora_hf.functional.add_low_rank_`,
    or, for a ZeRO-3 parameter, the same update of this rank's partition (and of the full value, if gathered)."""
    kwargs = {"transposed": transposed, "rounding": rounding, "generator": generator}
    if not is_zero3(weight):
        functional.add_low_rank_(weight, u, v, alpha, **kwargs)
        return
    import torch.distributed as dist

    part = weight.ds_tensor  # this rank's slice of the flattened W, padded at the end of the last rank
    start = part.ds_numel * dist.get_rank(group=weight.ds_process_group)
    end = min(start + part.ds_numel, weight.ds_numel)
    if weight.numel() == weight.ds_numel:  # gathered right now (e.g. persistent small parameters): update both
        functional.add_low_rank_(weight.data, u, v, alpha, **kwargs)
        if start < end:
            part.data[: end - start].copy_(weight.data.reshape(-1)[start:end])
        return
    if start >= end:
        return  # this rank holds only padding
    left, right = (v.T, u.T) if transposed else (u, v)
    cols = right.shape[1]
    first, last = start // cols, (end + cols - 1) // cols
    local = part.data[: end - start]
    compute = torch.float64 if local.dtype == torch.float64 else torch.float32
    # The rows [first, last) of U V cover the slice: a temporary about the size of this rank's partition.
    product = (left[first:last].to(compute) @ right.to(compute)).reshape(-1)[start - first * cols : end - first * cols]
    if local.dtype == compute:
        local.add_(product, alpha=alpha)
        return
    exact = local.float().add_(product, alpha=alpha)
    local.copy_(functional.stochastic_round(exact, local.dtype, generator) if rounding == "stochastic" else exact)
