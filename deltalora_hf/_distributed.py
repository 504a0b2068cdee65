r"""What Delta-LoRA needs to know about partitioned parameters: DeepSpeed ZeRO-3 and torch ``DTensor`` (FSDP2).

The rest of the package calls only these functions; DeepSpeed is imported lazily, when a ZeRO-3 parameter
(one with a ``ds_id``) is seen, so it is never needed otherwise.

* ``gathered`` / ``full_values``: the whole, readable value of a factor (to record anchors, to cache
  the factors of the in-place update, to log norms, to export).
* ``used_in_forward``: a factor read by a layer's own ``forward`` outside the forward of the submodule that
  owns it (PEFT's embedding factors); ZeRO-3 is told to gather it with that layer.
* ``check_writable_base`` and ``add_low_rank_``: the in-place W update, on each rank's own part of W
  and with no communication beyond gathering the small factors.

  Under ZeRO-3 each rank owns one contiguous slice of the flattened W (``param.ds_tensor``); the update of that
  slice needs only the matching elements of the rank-2r product:

  .. math::

      W_{\text{flat}}[s:e] \mathrel{+}= \alpha\,\operatorname{vec}(U_{[i_0:i_1]} V)[s - i_0 k : e - i_0 k],
      \qquad i_0 = \lfloor s/k \rfloor,\ i_1 = \lceil e/k \rceil

  (k columns of W as stored). A ``DTensor`` W (FSDP2's ``fully_shard``, transformers' native FSDP2 loading) holds
  on each rank one block ``W[r_0:r_1, c_0:c_1]`` of W as stored (rows for ``Shard(0)``, columns for ``Shard(1)``,
  all of a dimension for ``Replicate``), so

  .. math::

      W[r_0:r_1, c_0:c_1] \mathrel{+}= \alpha\, L_{[r_0:r_1]} R_{[:, c_0:c_1]}, \qquad
      (L, R) = (U, V) \text{ or } (V^T, U^T) \text{ if W is stored transposed,}

  computed by ``deltalora_hf.functional.add_low_rank_`` on the local shard (the same stochastic rounding for
  bfloat16/float16). The block is found from the DTensor's public ``placements`` and ``device_mesh`` with
  ``torch.chunk``'s rule (how ``Shard`` splits a dimension, uneven sizes included) and checked against the local
  shard's shape. Layouts without such a block (``Partial`` sums, strided shards of 2-D FSDP + TP meshes), a
  tensor-parallel mesh dimension (``"tp"``, transformers' ``tp_plan``: not tested with LoRA), and quantized or
  non-float W are refused, naming ``base_update="factored"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.utils.parametrize

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


def unsharded(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (``full_tensor()``: a collective, every rank must call it); anything else as is.
    For tensors read outside ``gathered`` (e.g. the adapter's state dict under FSDP2)."""
    return t.full_tensor() if is_dtensor(t) else t


def full_values(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Like ``gathered`` without a block: tensors that are not partitioned are returned as they are (no copy),
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


def is_main_process() -> bool:
    """Rank 0 of an initialized ``torch.distributed`` job, or a process that is not part of one."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def in_place_problem(weight: torch.Tensor) -> str | None:
    """Why ``add_low_rank_`` cannot update ``weight`` in place, or ``None`` if it can.

    Plain floating-point tensors, ZeRO-3 partitions (updated slice by slice) and DTensors that hold a block of W on
    each rank (FSDP2) can be written; quantized weights, ZeRO-3 layouts this module does not handle (NVMe offload,
    hpZ secondary partitions, quantized frozen weights) and other DTensor layouts cannot.
    """
    if is_zero3(weight):
        return _zero3_layout_problem(weight)
    if is_dtensor(weight):
        return _dtensor_layout_problem(weight)
    if type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point:
        return f"it is a {type(weight.data).__name__} of dtype {weight.dtype} (quantized or not floating point)"
    return None


def check_writable_base(base: torch.nn.Module, name: str) -> None:
    """Raise a ``RuntimeError`` naming ``base_update='factored'`` unless the in-place update of the base layer
    ``base`` reaches the tensor its forward reads: not through a parametrization (``torch.nn.utils.parametrize``:
    ``base.weight`` is then computed anew on every read, and a write to it is lost), and into a weight that
    ``check_writable_in_place`` accepts."""
    if torch.nn.utils.parametrize.is_parametrized(base, "weight"):
        raise RuntimeError(
            f"Delta-LoRA cannot update the base weight of {name} in place: it is parametrized "
            "(torch.nn.utils.parametrize), so W is computed from another tensor on every read and a write to it would "
            "be lost. Nothing was changed. Use DeltaLoraConfig(base_update='factored'), which never writes W, or "
            "remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations)."
        )
    check_writable_in_place(base.weight, name)


def check_writable_in_place(weight: torch.Tensor, name: str) -> None:
    """Raise a ``RuntimeError`` naming ``base_update='factored'`` unless ``add_low_rank_`` can update
    ``weight`` in place (see ``in_place_problem``)."""
    reason = in_place_problem(weight)
    if reason is None:
        return
    kind = "ZeRO-3 " if is_zero3(weight) else "sharded (DTensor) " if is_dtensor(weight) else ""
    alternative = ", or drop that ZeRO-3 option" if is_zero3(weight) else ""
    raise RuntimeError(
        f"Delta-LoRA cannot update the {kind}base weight of {name} in place: {reason}. Use "
        f"DeltaLoraConfig(base_update='factored'), which never writes W{alternative}."
    )


def _dtensor_layout_problem(weight: torch.Tensor) -> str | None:
    from torch.distributed.tensor import Replicate, Shard

    if weight.ndim != 2 or not weight.dtype.is_floating_point:
        return f"it is not a 2-D floating-point matrix ({tuple(weight.shape)}, {weight.dtype})"
    if "tp" in (weight.device_mesh.mesh_dim_names or ()):
        return (
            "it is split over a tensor-parallel mesh dimension ('tp', e.g. from transformers' tp_plan); the in-place "
            "update supports FSDP2/HSDP shards only"
        )
    odd = [p for p in weight.placements if type(p) not in (Shard, Replicate)]  # _StridedShard subclasses Shard
    if odd:
        return f"its placement {odd[0]} gives no rank a plain block of W (supported: Shard, Replicate)"
    with torch.no_grad():
        local = weight.to_local()
    if type(local) is not torch.Tensor:
        return f"its local shard is a {type(local).__name__} (quantized?)"
    block = _local_block(weight)
    if block is not None and tuple(local.shape) != tuple(s.stop - s.start for s in block):
        return f"its local shard {tuple(local.shape)} is not the block torch.chunk gives ({block})"
    return None


def _local_block(weight: torch.Tensor) -> tuple[slice, ...] | None:
    """The block of the global ``weight`` that this rank's local shard holds (``None`` if the rank is not in the
    mesh), for ``Shard``/``Replicate`` placements: mesh dimension after mesh dimension, ``Shard(d)`` splits what
    is left of dimension d as ``torch.chunk`` does (chunks of ``ceil(n / size)``, the last ones shorter or empty)."""
    mesh = weight.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    starts, sizes = [0] * weight.ndim, list(weight.shape)
    for mesh_dim, placement in enumerate(weight.placements):
        if placement.is_shard():
            dim = placement.dim % weight.ndim
            chunk = -(-sizes[dim] // mesh.size(mesh_dim))
            offset = min(coordinate[mesh_dim] * chunk, sizes[dim])
            starts[dim] += offset
            sizes[dim] = min(chunk, sizes[dim] - offset)
    return tuple(slice(start, start + size) for start, size in zip(starts, sizes))


def copy_from_full_(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` where ``value`` is the whole (e.g. gathered) value; a DTensor ``target`` gets the
    block of ``value`` that its local shard holds (no communication)."""
    if not is_dtensor(target):
        target.copy_(value)
        return
    block = _local_block(target)
    if block is not None:
        with torch.no_grad():
            target.to_local().copy_(value[block])


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
    """``weight += alpha * U @ V`` (``(U @ V)^T`` if ``transposed``): ``deltalora_hf.functional.add_low_rank_``,
    or, for a ZeRO-3 parameter or a DTensor, the same update of this rank's part of W (see the module docstring)."""
    kwargs = {"transposed": transposed, "rounding": rounding, "generator": generator}
    if is_dtensor(weight):
        _add_low_rank_to_shard_(weight, u, v, alpha, **kwargs)
        return
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


def _add_low_rank_to_shard_(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, alpha: float, **kwargs) -> None:
    """The DTensor case of ``add_low_rank_``: this rank's block of W from the matching rows of L, columns of R."""
    block = _local_block(weight)
    with torch.no_grad():
        local = weight.to_local()  # the storage FSDP2 gathers from: written in place, no communication
    if block is None or local.numel() == 0:
        return  # this rank holds nothing of W (uneven shards: the last ranks may be empty)
    rows, cols = block
    left, right = (v.T, u.T) if kwargs.pop("transposed") else (u, v)
    left, right = left[rows].to(local.device), right[:, cols].to(local.device)  # e.g. FSDP2 CPU offload
    functional.add_low_rank_(local, left, right, alpha, **kwargs)
