"""PPO under DeepSpeed ZeRO-3: whole parameters where PPO needs them whole, shards everywhere else.

ZeRO-3 keeps a slice of every parameter on each rank. Its engine hooks every submodule: just before a
module runs, its parameters are all-gathered; just after, they are released. That serves passes that every
rank runs in step (training, and the rollout's no-grad forwards of the reference, critic and reward roles),
but not sampling: generate() runs one forward per new token, so it would all-gather every layer once per
token, and every rank would have to keep running forwards until the longest answer on any rank ends.

- `whole_parameters(engine)` gathers every parameter once, for a whole generate call, and takes the
  engine's module hooks off meanwhile (left on, they would release each layer after its first forward);
  on the way out the parameters are sharded again and the hooks put back. Peak memory: the full model.
- `gathered(params, writer)` gathers some parameters outside any forward pass: to read them (saving) or,
  with `writer`, to load values into them that this rank then broadcasts (resuming).
- `prepare_deepspeed` builds the engine and makes ZeRO-3 accumulate each step's gradients from zero (see there).

They do nothing unless the parameters are ZeRO-3's (DDP, ZeRO-1/2, a single process).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def is_sharded(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (sharded over the ranks, or kept whole under stage3_param_persistence_threshold)."""
    return hasattr(param, "ds_id")


def _zero3_offload(engine: Any) -> Any:
    """The ZeRO-3 optimizer's parameter-offload object, which owns the module hooks; None without ZeRO-3."""
    return getattr(getattr(engine, "optimizer", None), "parameter_offload", None)


def prepare_deepspeed(accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    """accelerate's DeepSpeed engine and optimizer; under ZeRO-3, gradients accumulated from zero every step.

    ZeRO-3 keeps every parameter's gradient shard in one flat buffer that lives across optimizer steps: the
    first backward of a step (its micro-step 0) overwrites a parameter's shard, later backwards add to it. A
    parameter that gets no gradient in micro-step 0 (the critic's, in the policy's backward) therefore adds
    its first gradient of a step onto the previous step's. Checked on the tiny model: after two PPO steps the
    critic adapter and value head were 3.7e-4 away from DDP's, while a run resumed after step 1 (a new,
    zeroed buffer) matched DDP to 1e-6. The buffer is zeroed after every optimizer step (not in zero_grad,
    which ZeRO-3's step calls before it reads the buffer).
    """
    engine, optimizer = accelerator.prepare(model, optimizer)
    zero3 = getattr(engine, "optimizer", None)
    if _zero3_offload(engine) is not None and getattr(zero3, "grad_partitions_flat_buffer", None) is not None:
        step = zero3.step

        def step_then_clear(*args: Any, **kwargs: Any) -> Any:
            result = step(*args, **kwargs)
            zero3.grad_partitions_flat_buffer.zero_()
            return result

        zero3.step = step_then_clear
    return engine, optimizer


@contextmanager
def whole_parameters(engine: Any) -> Iterator[None]:
    """Every parameter of a ZeRO-3 engine's module whole on this rank, with no gathering per module meanwhile.

    Collective: every rank enters together. Passes run inside never talk to the other ranks, so ranks may
    run different numbers of forwards (generate() stops when its own rows are done).
    """
    offload = _zero3_offload(engine)
    if offload is None:
        yield
        return
    import deepspeed

    params = list(offload.module.parameters())
    with deepspeed.zero.GatheredParameters(params):  # one gather of them all (a collective per sharded tensor)
        for hook in (*offload.forward_hooks, *offload.backward_hooks):
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        for param in params:  # a module left "active" by an earlier pass would keep its parameters whole
            param.ds_active_sub_modules.clear()
        try:
            yield
        finally:
            # New hooks on every submodule; re-registering the root also invalidates the coordinator's trace
            # of the training pass, which it records again at the next forward.
            offload._register_deepspeed_module(offload.module)


@contextmanager
def gathered(params: Iterable[torch.Tensor], writer: int | None = None) -> Iterator[None]:
    """These ZeRO-3 parameters whole on every rank, outside any forward pass; collective.

    With `writer` (a rank) the values that rank holds when the block ends are broadcast and sharded again,
    so load into them there; without it the block must only read them.
    """
    sharded = [param for param in params if is_sharded(param)]
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=writer):
        yield
