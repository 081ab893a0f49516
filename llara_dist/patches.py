"""Every use of a third-party internal, in one place, each with the versions it was checked against.

| here                      | what it relies on                                                | checked with          |
|---------------------------|------------------------------------------------------------------|-----------------------|
| skip_local_gather_syncs   | DeepSpeed's NoGatherHandle / NoGatherCoalescedHandle: their      | deepspeed 0.19.8      |
|                           | `wait`, and the private `__param` / `__params` they hold          |                       |
| torch_linear              | DeepSpeed's zero.Init replacing torch.nn.functional.linear for   | deepspeed 0.19.8,     |
|                           | the whole process                                                | torch 2.11-2.13       |
| kernel_function,          | kernels' function wrapper (use_kernel_forward_from_hub on a      | kernels 0.19.1,       |
| rotary_wrapper            | function) keeping it in its forward's closure as `func`; the     | transformers 5.25     |
|                           | per-instance wrappers of use_kernelized_func in `_kernel_funcs`  |                       |
| BLOCK_MASK_COMPILE        | create_block_mask's private `_compile=` keyword (FlexAttention)  | torch 2.11-2.13       |
| LLARA_MASK                | HF decoders passing unknown keyword arguments of the model call  | transformers 5.17-5.25|
|                           | through to the attention function (how each layer gets the mask) |                       |
| unshare_adam_steps        | the `step` tensor in the torch optimizer's state that DeepSpeed  | deepspeed 0.19.8,     |
|                           | wraps (engine.optimizer.optimizer.state)                          | torch 2.11-2.13       |

`problems()` confirms at start-up that each of these still exists as used, and names what is
missing and what to do, so a release that renames one is refused before any work, not met as an
AttributeError deep in a step. `llara-dist train` and `finetune` refuse to start on any problem.
"""

from __future__ import annotations

import contextlib
import inspect
import types

import torch
import torch.nn.functional as F

LLARA_MASK = "llara_mask"  # the keyword that carries a micro-batch's mask to every attention call
BLOCK_MASK_COMPILE = "_compile"  # create_block_mask: build the mask with a compiled kernel (CUDA)
_NO_GATHER = (("NoGatherHandle", "_NoGatherHandle__param"),  # DeepSpeed class, the private name it holds
              ("NoGatherCoalescedHandle", "_NoGatherCoalescedHandle__params"))


def problems() -> list[str]:
    """What is missing of the internals used here, each with what to do; [] when all are in place."""
    out = []
    try:
        from deepspeed.runtime.zero import partition_parameters as pp

        for cls_name, attr in _NO_GATHER:
            cls = getattr(pp, cls_name, None)
            if cls is None or not callable(getattr(cls, "wait", None)) or attr not in cls.__init__.__code__.co_names:
                out.append(f"deepspeed {_version('deepspeed')}: partition_parameters.{cls_name} has no `wait` or no "
                           f"{attr} (skip_local_gather_syncs); install deepspeed 0.19.x")
    except ImportError:
        pass  # no DeepSpeed: nothing to patch (the trainer says it is missing)
    from torch.nn.attention.flex_attention import create_block_mask

    if BLOCK_MASK_COMPILE not in inspect.signature(create_block_mask).parameters:
        out.append(f"torch {torch.__version__}: create_block_mask takes no {BLOCK_MASK_COMPILE}= (the flex "
                   f"attention path); use model.attn=sdpa, or torch 2.11-2.13")
    from transformers.models.llama import modeling_llama

    for fn, role in ((modeling_llama.LlamaModel.forward, "model"), (modeling_llama.LlamaAttention.forward, "attention")):
        if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(inspect.unwrap(fn)).parameters.values()):
            out.append(f"transformers {_version('transformers')}: the LLaMA {role} forward takes no **kwargs, so "
                       f"{LLARA_MASK}= cannot reach the attention; install transformers 5.17-5.25")
    rope = getattr(modeling_llama, "apply_rotary_pos_emb", None)
    if isinstance(rope, torch.nn.Module) and kernel_function(rope) is None:  # a kernels wrapper of another build
        out.append(f"kernels {_version('kernels')}: its function wrapper no longer keeps `func` (model.fused_ops); "
                   f"set model.fused_ops=false, or install kernels 0.19.x")
    return out


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(not installed)"


def block_mask(mask_mod, rows: int, length: int, device, block: int, compiled: bool):
    """torch's create_block_mask for rows of `length` queries and keys, built by a compiled kernel
    if `compiled` (on CUDA: the eager build materialises the whole [rows, length, length] mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, rows, None, length, length, device=device, BLOCK_SIZE=block,
                             **{BLOCK_MASK_COMPILE: compiled})


def kernel_function(wrapper) -> types.FunctionType | None:
    """The plain function inside a kernels function wrapper (`use_kernel_forward_from_hub` on a
    function makes it an nn.Module instance): kernels keeps it, as `func`, in the closure of the
    wrapper class's forward. None if it is not there."""
    forward = getattr(type(wrapper), "forward", None)
    if not isinstance(forward, types.FunctionType):
        return None
    cells = dict(zip(forward.__code__.co_freevars, (c.cell_contents for c in forward.__closure__ or ())))
    return cells.get("func") if inspect.isfunction(cells.get("func")) else None


def rotary_wrapper(attention, layer_name: str):
    """The attention instance's private wrapper of the function kernels calls `layer_name`
    (use_kernelized_func gives each instance one, in `_kernel_funcs`), or None."""
    return next((f for f in vars(attention).get("_kernel_funcs", {}).values()
                 if getattr(type(f), "kernel_layer_name", None) == layer_name), None)


@contextlib.contextmanager
def torch_linear():
    """torch's own F.linear for a compiled layer. DeepSpeed's zero.Init replaces F.linear, for the
    whole process, by an autograd Function whose backward looks each weight's ZeRO-3 state up
    (memory_efficient_linear). Traced into a compiled layer, that lookup made torch 2.11 guard on
    each weight's `ds_id`: one compile per layer, and past torch's recompile limit (8) the layers ran
    eagerly (seen on an H100 at 8 layers). A compiled layer needs none of it: its weights are gathered
    whole by the layer's own hooks (ZeRO-3 by layer) or never partitioned (ZeRO-2), and the compiled
    backward uses them as saved, as DeepSpeed's traced Function did."""
    patched = F.linear
    F.linear = torch._C._nn.linear
    try:
        yield
    finally:
        F.linear = patched


def unshare_adam_steps(engine) -> None:
    """After loading a universal checkpoint under ZeRO-3: give every sub-group its own Adam step.

    DeepSpeed (0.19.8, stage3.py load_hp_checkpoint_state_from_checkpoint_dir_stage3) sets the one
    `step` tensor it read as the step of every sub-group's state, and torch's Adam adds 1 to it in
    place once per sub-group: with k sub-groups (sub_group_size, 1e9 by default: a 7B model has
    several per rank on few ranks) the step grew by k at every optimizer step, and with it the bias
    correction. A CPU-offloaded Adam keeps an int there, which has no such sharing."""
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def skip_local_gather_syncs() -> None:
    """No host sync when ZeRO-3 'gathers' a parameter that is whole on this device already.

    With partitions of one rank (one GPU), DeepSpeed's gather is a view of the rank's own partition,
    yet its NoGather handles wait on the host for the current stream: on the H100 bench about 25
    syncs per micro-batch, the GPU idle while the host catches up. That wait guards a copy from an
    offloaded (CPU) partition; where the partition is on the parameter's device no copy was made, so
    the handle completes without it (DeepSpeed's own wait, told the device orders the data). Idempotent."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero import partition_parameters as pp

    for cls_name, attr in _NO_GATHER:
        cls = getattr(pp, cls_name)
        original = cls.wait
        if getattr(original, "skips_local_sync", False):
            continue

        def wait(self, *args, _original=original, _attr=attr, **kwargs):
            params = getattr(self, _attr, None)
            params = [params] if isinstance(params, torch.nn.Parameter) else params
            local = bool(params) and all(getattr(p, "ds_tensor", None) is not None
                                         and p.ds_tensor.device == p.data.device for p in params)
            if not local:  # a copy crossed devices (offload), or a DeepSpeed we do not know: its wait
                return _original(self, *args, **kwargs)
            accelerator = get_accelerator()
            shadowed = accelerator.__dict__.get("resolves_data_dependency")
            accelerator.resolves_data_dependency = lambda: True  # for this call only
            try:
                return _original(self, *args, **kwargs)
            finally:
                if shadowed is None:
                    del accelerator.resolves_data_dependency
                else:
                    accelerator.resolves_data_dependency = shadowed

        wait.skips_local_sync, wait.original = True, original
        cls.wait = wait
