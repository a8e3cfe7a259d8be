"""A DeepSpeed engine behind the phase runner's ``StepEngine`` protocol, and the sparse-phase
projection for every ZeRO stage.

The runner calls ``loss_fn(engine.module, batch)``, ``engine.backward(loss)`` and ``engine.step()``,
so the single-process loop (``deftx.training.phase.run_phase``) drives DeepSpeed unchanged.
Requires ``torch.distributed`` to be initialised (Ray Train or a launcher does it).
"""

from __future__ import annotations

import ctypes
import importlib.abc
import sys
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from deftx.training.distributed.selection import partition_span
from deftx.training.engine import adamw, linear_schedule

SHM_COMM_OP = "deepspeed_shm_comm"


class _NoMlflow(importlib.abc.MetaPathFinder):
    """Refuses ``mlflow`` (and its submodules) while installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("mlflow is not imported on DeepSpeed's behalf")
        return None


def load_deepspeed():
    """``import deepspeed``, without the ``mlflow`` import that DeepSpeed's autotuner (a feature
    deftx does not use) attempts when its module loads: that import is 1.7 of the 2.2 s DeepSpeed
    takes to import on the reference machine, paid by every worker of every phase. While DeepSpeed
    loads, ``import mlflow`` fails, and the autotuner records that MLflow is missing. Later imports
    of ``mlflow`` (deftx's live tracking on rank 0) are untouched, and a process that already
    imported ``mlflow`` keeps it: DeepSpeed then sees that module as usual."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    guard = _NoMlflow()
    sys.meta_path.insert(0, guard)
    try:
        import deepspeed
    finally:
        sys.meta_path.remove(guard)
    return deepspeed


def skip_inference_comm_op() -> None:
    """Keep DeepSpeed from building its shared-memory all-reduce op when it sets up communication.
    The op serves only ``inference_all_reduce`` (tensor-parallel inference), which training never
    calls; building it JIT-compiles C++ into ``~/.cache/torch_extensions`` (about 35 s on a fresh
    machine) and prints a line on every worker of every job. DeepSpeed keeps its table of
    compatible ops in one module-level dict, read when the communication backend is created."""
    load_deepspeed()
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def checkpoint_safe_globals() -> list:
    """The classes, besides tensors and plain containers, that a deftx DeepSpeed checkpoint holds:
    ZeRO 1-3 optimizer states need the stage enum, the loss scaler and the fragment addresses
    (found by resuming real ZeRO 0-3 checkpoints with ``weights_only=True``; ZeRO-0 needs none).
    ``DynamicLossScaler`` is the scaler DeepSpeed keeps under fp16. Nothing else may be rebuilt
    when a checkpoint is read."""
    load_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def weights_only_load(path: str, map_location=None):
    """``torch.load`` of a checkpoint file that rebuilds tensors, plain containers and the
    classes of :func:`checkpoint_safe_globals` only; anything else raises ``UnpicklingError``."""
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def use_weights_only_loading(engine) -> None:
    """Make DeepSpeed ``engine`` read checkpoints with :func:`weights_only_load` instead of its
    default unpickling (``weights_only=False``), which runs whatever code a tampered checkpoint
    file names. Writing is unchanged. Every file ``load_checkpoint`` reads (model states, ZeRO
    optimizer partitions) goes through the engine's ``checkpoint_engine.load``."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None:
        raise RuntimeError("the DeepSpeed engine has no checkpoint engine to read with")
    checkpoint_engine.load = weights_only_load


def input_embedding(module: nn.Module) -> nn.Embedding | None:
    """The model's word (input) embedding, when it is a plain ``nn.Embedding``."""
    get = getattr(module, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb if isinstance(emb, nn.Embedding) else None


class DeepSpeedEngine:
    """torch AdamW (fused on CPU) as DeepSpeed's client optimizer (no compiled optimizer ops
    needed), a linear schedule, gradient clipping, ZeRO ``stage`` 0-3.

    Under ZeRO-0 with the word embedding trained (``sparse_embedding``), the embedding produces
    sparse gradients: a batch touches a few hundred of its 250k rows, and DeepSpeed all-gathers
    only those rows (their indices and values) instead of all-reducing the dense 96M-entry
    gradient. After the reduction the gradient is made dense again, so clipping and AdamW see
    the same averaged gradient as before (up to the order in which repeated tokens' rows are
    summed). ZeRO 1-3 partition the gradients and do not take sparse ones."""

    def __init__(self, module: nn.Module, params: Sequence[nn.Parameter], *, learning_rate: float,
                 weight_decay: float, total_steps: int, warmup_ratio: float = 0.0,
                 max_grad_norm: float | None = 1.0, zero_stage: int = 2, micro_batch_size: int = 1,
                 sparse_embedding: bool = True) -> None:
        deepspeed = load_deepspeed()

        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0-3, got {zero_stage}")
        skip_inference_comm_op()
        trainable = [p for p in params if p.requires_grad]
        self._sparse: nn.Embedding | None = None
        self._after_reduction: list = []
        emb = input_embedding(module) if sparse_embedding and zero_stage == 0 else None
        hooked = emb is not None and bool(getattr(emb.weight, "_backward_hooks", None)
                                          or getattr(emb.weight, "_post_accumulate_grad_hooks", None))
        # a gradient hook (a mask of a sparse phase or of a subnetwork) expects a dense gradient
        if emb is not None and not hooked and not emb.sparse and any(p is emb.weight for p in trainable):
            emb.sparse = True
            self._sparse = emb
            # DeepSpeed rebuilds the reduced gradient with torch.sparse_coo_tensor, which warns on
            # every rank that invariant checks are off unless told explicitly: they stay off (the
            # indices come from the embedding's own backward), now without the warning
            torch.sparse.check_sparse_tensor_invariants.disable()
        optimizer = adamw(trainable, learning_rate=learning_rate, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup_ratio))
        config = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": 1,
                  "zero_optimization": zero_config(zero_stage), "steps_per_print": 10**9,
                  "gradient_clipping": float(max_grad_norm or 0.0), "zero_allow_untested_optimizer": True}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, model_parameters=trainable, config=config)
        self.module = self.engine.module
        if zero_stage in (1, 2):
            use_direct_norm(self.optimizer)
        self.zero_stage = zero_stage

    @property
    def reduced_apart(self) -> tuple[nn.Parameter, ...]:
        """Parameters whose gradient this engine reduces sparsely: a regulariser must add its dense
        part to them after the reduction (``L1Penalty(apart=...)``, :meth:`after_reduction`)
        instead of through the loss, or their gradient turns dense before it is reduced."""
        return (self._sparse.weight,) if self._sparse is not None else ()

    def after_reduction(self, add_gradients) -> None:
        """Call ``add_gradients()`` after each backward's reduction, before clipping and AdamW."""
        self._after_reduction.append(add_gradients)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # under ZeRO-0 this also reduces the gradients over the ranks
        if self._sparse is not None:
            weight = self._sparse.weight
            if weight.grad is not None and weight.grad.is_sparse:
                weight.grad = weight.grad.to_dense()  # sums the rows gathered from every rank
        for add in self._after_reduction:
            add()

    def step(self) -> None:
        self.engine.step()

    def close(self) -> None:
        """Give the embedding back its dense gradients (the module outlives the engine)."""
        if self._sparse is not None:
            self._sparse.sparse = False
            self._sparse = None
        self._after_reduction.clear()

    def release(self) -> None:
        """Free the memory of the module's parameters and of the optimizer, after ``destroy``.
        DeepSpeed's stage-3 engine stays reachable after ``destroy`` (its initialisation pushes the
        module on a module-level stack that is never popped, and hooks registered on the optimizer
        and on the parameters close over the engine), so dropping the last Python reference frees
        nothing: 1.5 GB per worker of a W=2 e5-small phase 1 stayed alive through phase 2. Emptying
        the tensors themselves frees them whoever still refers to them. The module is unusable
        afterwards."""
        for param in self.engine.module.parameters():
            _empty_tensors(getattr(param, "ds_tensor", None))   # the ZeRO-3 partition
            param.grad = None
            _empty_tensors(param)
        for optimizer in (getattr(self.optimizer, "optimizer", None), self.optimizer):
            for state in getattr(optimizer, "state", {}).values():
                _empty_tensors(state)
        for owner in (self.optimizer, self.engine):
            for name, value in list(vars(owner).items()):
                if name != "module":
                    _empty_tensors(value)

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def tensors_within(value, depth: int = 0):
    """The tensors in ``value``: a tensor, or lists / tuples / dicts of them, two levels deep."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 2 and isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_within(item, depth + 1)
    elif depth < 2 and isinstance(value, Mapping):
        for item in value.values():
            yield from tensors_within(item, depth + 1)


def _empty_tensors(value) -> None:
    """Point every tensor within ``value`` at an empty storage, so that its memory is freed once
    no other tensor views it."""
    for tensor in tensors_within(value):
        if tensor.numel():
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


def return_freed_memory() -> None:
    """Ask glibc's allocator to give freed heap memory back to the system (tensors below its mmap
    threshold are carved from the heap, which otherwise only grows); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


CPU_BUCKET_SIZE = 50_000_000  # gradient elements reduced per bucket on CPU (DeepSpeed's default: 5e8)


def zero_config(stage: int) -> dict:
    """The ``zero_optimization`` section. On CPU, ZeRO-1/2 keep each gradient where autograd put it
    (``contiguous_gradients: false``: no copy into a contiguous buffer during backward, which on
    CPU only costs time) and reduce in buckets of 50M elements (the default 5e8 is a 2 GB fp32
    buffer, allocated and faulted in each step). Measured on the offline e5-small at W=1, ZeRO-2:
    backward 0.54 s -> 0.30 s per step (single process: 0.26 s). ZeRO-3 on CPU reduces in the same
    buckets: peak RSS per worker of a task phase 1 at W=2 fell from 4.76 to 4.23 GB (smaller
    ``stage3_max_live_parameters`` / prefetch buckets changed nothing measurable). GPU runs keep
    DeepSpeed's defaults."""
    out: dict = {"stage": stage}
    if stage in (1, 2) and not torch.cuda.is_available():
        out.update(contiguous_gradients=False, reduce_bucket_size=CPU_BUCKET_SIZE)
    if stage == 3 and not torch.cuda.is_available():
        out.update(reduce_bucket_size=CPU_BUCKET_SIZE)
    return out


def use_direct_norm(optimizer) -> None:
    """Make a ZeRO-1/2 optimizer compute the gradient norm for clipping the way the single-process
    engine does (``torch.nn.utils.clip_grad_norm_``: each gradient's 2-norm in its own float32,
    then the norm of those norms), instead of DeepSpeed's ``get_grad_norm_direct``, which copies
    every gradient of the partition to float64 first: on CPU a copy of twice the model's size and
    a slow float64 reduction per step (0.23 s of a 0.55 s e5-small step at W=1). The per-tensor
    norms are combined in float64 and summed over the ranks as before. Only the 2-norm of
    data-parallel training (no model or pipeline parallelism, which deftx does not use) is replaced."""
    from deepspeed.comm import pg_utils
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    original = getattr(optimizer, "get_grad_norm_direct", None)
    if original is None or pg_utils.is_parallel(getattr(optimizer, "model_parallel_group", None)):
        return

    def direct_norm(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return original(gradients, params, norm_type)
        grads = [g.detach() for g in gradients if not getattr(g, "_zero_padding", False)]
        norms = torch._foreach_norm(grads, 2) if grads else []
        total = torch.stack(norms).double().pow(2).sum().float() if norms else torch.zeros((), dtype=torch.float32)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
        total = total.pow(0.5)
        mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
        return total

    optimizer.get_grad_norm_direct = direct_norm


@torch.no_grad()
def project_outside_mask(params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor],
                         reference: Mapping[str, torch.Tensor], zero_stage: int) -> None:
    """Write ``reference`` back outside ``masks`` in the fp32 master *and* the forward weights.
    Collective under ZeRO 1-3: every rank must call it with the same tensors in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    for name in sorted(params):
        p, mask, ref = params[name], masks[name], reference[name]
        if zero_stage == 0:
            torch.where(mask, p.data, ref, out=p.data)
            continue
        master = safe_get_full_fp32_param(p)
        fixed = torch.where(mask, master, ref)
        safe_set_full_fp32_param(p, fixed)
        if zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    p.data.copy_(fixed.to(p.dtype))
        else:
            p.data.copy_(fixed.to(p.dtype))


@torch.no_grad()
def gather_owned(params: Mapping[str, torch.Tensor], needed: Mapping[str, tuple[int, int] | None],
                 zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 copies of what this rank scores: ``needed`` maps a tensor name to a flat span
    [start, stop), or None for the whole tensor (``ShardPlan.needed(rank)``).

    Under ZeRO-3 a parameter is partitioned. A span that is exactly this rank's partition is read
    from it without communication; every other parameter is gathered in turn (a collective that
    every rank enters, in name order, unless every rank reads its own partition of it) and each rank
    copies only its part, so no rank ever holds more than one gathered tensor beyond its own parts.
    Under ZeRO 0-2 every rank holds full weights, and so does every rank for plain tensors."""
    out: dict[str, torch.Tensor] = {}

    def keep(name: str, data: torch.Tensor) -> None:
        span = needed[name]
        part = data if span is None else data.reshape(-1)[span[0]: span[1]]
        out[name] = part.detach().float().clone()

    for name in sorted(params):
        p = params[name]
        if zero_stage == 3 and hasattr(p, "ds_id"):
            own = _own_partition(p, needed.get(name))
            if own is not None:  # the plan splits this tensor along the partitions: no gather
                out[name] = own
                continue
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                if name in needed:
                    keep(name, p.data)
        elif name in needed:
            keep(name, p.data)
    return out


def _own_partition(param: torch.Tensor, span: tuple[int, int] | None) -> torch.Tensor | None:
    """The entries ``span`` of a ZeRO-3 parameter when they are exactly this rank's partition."""
    if span is None:
        return None
    numel, world, rank = int(param.ds_numel), dist.get_world_size(), dist.get_rank()
    if span != partition_span(numel, rank, world) or param.ds_tensor.numel() != -(-numel // world):
        raise ValueError(f"span {span} of a ZeRO-3 parameter is not rank {rank}'s partition "
                         f"(plan and DeepSpeed partitioning disagree)")
    return param.ds_tensor.detach()[: span[1] - span[0]].float().clone()


class DeepSpeedValueAccess:
    """``deftx.training.masked_values.ValueAccess`` under ZeRO ``zero_stage``: the values read are
    the fp32 master weights, the write-back goes to the master and the forward weights. Every
    method is collective under ZeRO 1-3 (all ranks, same tensors, same order)."""

    def __init__(self, zero_stage: int) -> None:
        self.zero_stage = zero_stage

    @torch.no_grad()
    def master_values(self, params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, torch.Tensor] = {}
        for name in sorted(params):
            p = params[name]
            master = None if self.zero_stage == 0 else safe_get_full_fp32_param(p)
            out[name] = (p.data if master is None else master).detach().reshape(p.ds_shape if self.zero_stage == 3
                                                                               else p.shape).clone()
        return out

    def write_outside(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor],
                      reference: Mapping[str, torch.Tensor]) -> None:
        project_outside_mask(params, masks, reference, self.zero_stage)

    def sum_across_ranks(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            dist.all_reduce(t)
