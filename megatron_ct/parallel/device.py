"""The CPU device layer: lets megatron-core's CUDA-assuming code paths run on CPU.

megatron-core places tensors with ``device='cuda'`` / ``torch.cuda.current_device()``,
calls ``.cuda()``, ``torch.cuda.synchronize()`` and the CUDA RNG API, and checks
``tensor.type() == 'torch.cuda.FloatTensor'`` in the gradient clipper and the
distributed optimizer. This module, and only this module, redirects those to the CPU
so the *same* schedules, DDP, optimizer and dist_checkpointing code run under gloo in
tests and for debugging.

It is installed only by :func:`activate_cpu_device_layer`, which the trainer calls when
``device == 'cpu'`` (no CUDA, or asked for). It never runs on a GPU: if CUDA is in use
nothing here is touched.

What it does, all process-wide and reversible with :func:`deactivate_cpu_device_layer`:
- a ``TorchFunctionMode`` rewrites ``device=`` arguments that name CUDA to ``'cpu'``,
  turns ``Tensor.cuda()`` into a no-op and answers ``Tensor.type()`` (no arguments)
  with the CUDA spelling megatron-core's type checks expect;
- megatron-core's mask builders and its context-parallel cut of the RoPE table (which index
  with ``device="cuda"`` / a pinned tensor inside the model's forward, where the mode is
  suspended) are replaced by CPU ones with the same values, and so are the MoE all-to-all
  dispatcher's host copy of its split sizes (NumPy arrays, as ``all_to_all_single`` needs) and
  its uneven all-gather / reduce-scatter over TP ranks (padded equal-size collectives for gloo);
- ``torch.cuda`` functions megatron-core calls (``current_device``, ``synchronize``,
  RNG state get/set, memory queries, streams/events, ...) are replaced by CPU
  equivalents or no-ops.

:func:`keep_freed_host_memory` (called by the trainer on CPU, after its start-up checks) tells
glibc's malloc to keep freed memory for reuse instead of returning it to the kernel after every
micro-batch.

Separately, :func:`install_cpu_wgrad_accumulation` gives megatron-core a CPU stand-in for
apex's ``fused_weight_gradient_mlp_cuda`` extension, used where a model's config sets
``gradient_accumulation_fusion`` (CPU training runs: ``megatron_ct.model.llama``).

:class:`HostSyncCounter` counts the calls that would synchronise a GPU with the host
(``.item()``, ``.cpu()``, ``.tolist()``, ``bool(t)``, ... and ``torch.cuda.synchronize``): tests
use it on CPU to hold the training step to its budget of host syncs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # megatron-core passes torch.cuda.current_device() (an int) as a device.
    return isinstance(dev, int) and not isinstance(dev, bool)


def _cpu_device(dev: Any) -> Any:
    return torch.device("cpu") if _is_cuda_device(dev) else dev


_REWRITTEN = frozenset({torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.to, torch.device})


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every torch call of the process passes here: the common case (no device argument,
        # not one of the four rewritten functions) returns at once.
        if func not in _REWRITTEN and (not kwargs or "device" not in kwargs):
            return func(*args, **(kwargs or {}))
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Type-string checks in megatron-core (clip_grads, distributed optimizer)
            # insist on 'torch.cuda.*Tensor'; answer as a GPU tensor would.
            tensor = args[0]
            return _CUDA_TYPE_NAMES.get(tensor.dtype, func(*args, **kwargs))
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func in (torch.Tensor.to,) and args:
            # t.to('cuda'), t.to(torch.device('cuda')), t.to(0, dtype)
            args = tuple(_cpu_device(a) if i == 1 else a for i, a in enumerate(args))
        elif func is torch.device and args:
            args = (_cpu_device(args[0]),) + tuple(args[1:])
        return func(*args, **kwargs)


class _Event:
    """Stand-in for torch.cuda.Event: records wall time so timers keep working."""

    def __init__(self, enable_timing: bool = False, **_: Any) -> None:
        self._t = 0.0

    def record(self, stream: Any = None) -> None:
        import time

        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _Event) -> float:
        return (end._t - self._t) * 1000.0


class _Stream:
    """Stand-in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> _Event:
        return event or _Event()


def _cuda_replacements() -> dict[str, Callable[..., Any]]:
    # Each replacement must be a distinct function object: torch._dynamo builds a
    # rule table keyed by the torch.cuda functions and rejects one object under two
    # names with different rules.
    def _zero(name: str) -> Callable[..., int]:
        def f(*a: Any, **k: Any) -> int:
            return 0

        f.__name__ = name
        return f

    def _noop(name: str) -> Callable[..., None]:
        def f(*a: Any, **k: Any) -> None:
            return None

        f.__name__ = name
        return f

    def current_device() -> torch.device:
        # A device object rather than the index 0: megatron-core passes it as
        # ``device=`` also inside autograd backward functions, where no torch-function
        # mode is active (a mode is suspended while its own handler runs, and the
        # backward pass runs inside the handler of torch.autograd.backward).
        return torch.device("cpu")

    repl: dict[str, Callable[..., Any]] = {
        "current_device": current_device,
        "device_count": lambda: 1,
        "get_rng_state": lambda device=None: torch.get_rng_state(),
        "set_rng_state": lambda state, device=None: torch.set_rng_state(state),
        "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)),
        "manual_seed_all": lambda seed: torch.default_generator.manual_seed(int(seed)),
        "current_stream": lambda device=None: _Stream(),
        "default_stream": lambda device=None: _Stream(),
        "stream": lambda s=None: contextlib.nullcontext(),
        "Stream": _Stream,
        "Event": _Event,
        "nvtx": _NoNvtx(),
    }
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        repl[name] = _zero(name)
    for name in ("set_device", "empty_cache", "reset_peak_memory_stats"):
        repl[name] = _noop(name)

    def synchronize(device: Any = None) -> None:
        for counter in HostSyncCounter.active:
            counter.record("torch.cuda.synchronize")

    repl["synchronize"] = synchronize
    return repl


class HostSyncCounter(TorchFunctionMode):
    """Counts device-to-host synchronisation points while active (``with HostSyncCounter() as c``).

    On a GPU each of these blocks the host until the device has caught up; on CPU they are
    cheap, which is why they are counted rather than timed."""

    active: list[HostSyncCounter] = []
    SYNC_CALLS = {
        torch.Tensor.item: ".item()",
        torch.Tensor.cpu: ".cpu()",
        torch.Tensor.tolist: ".tolist()",
        torch.Tensor.numpy: ".numpy()",
        torch.Tensor.__bool__: "bool()",
        torch.Tensor.__float__: "float()",
        torch.Tensor.__int__: "int()",
        torch.Tensor.__index__: "index()",
    }

    # Host tensors in a GPU run too, so reading them is no device sync: torch.optim's per-parameter
    # step counters (CPU scalars unless capturable/fused) and megatron-core's check that the CPU RNG
    # state did not change inside its CUDA RNG fork.
    HOST_RESIDENT = (("torch/optim/optimizer.py", "_get_value"), ("megatron/core/tensor_parallel/random.py", "fork"))

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def record(self, what: str) -> None:
        import traceback

        frame = next((f for f in reversed(traceback.extract_stack()[:-2]) if "torch/overrides" not in f.filename), None)
        if frame is not None and any(frame.filename.endswith(f) and frame.name == n for f, n in self.HOST_RESIDENT):
            return
        self.events.append(f"{what} at {frame.filename}:{frame.lineno}" if frame else what)

    @property
    def count(self) -> int:
        return len(self.events)

    def __enter__(self):
        HostSyncCounter.active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        HostSyncCounter.active.remove(self)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        what = self.SYNC_CALLS.get(func)
        if what is not None:
            self.record(what)
        return func(*args, **(kwargs or {}))


class _NoNvtx:
    def range_push(self, *a: Any, **k: Any) -> None:
        pass

    def range_pop(self) -> None:
        pass

    @contextlib.contextmanager
    def range(self, *a: Any, **k: Any):
        yield


_lock = threading.Lock()
_state: dict[str, Any] = {"mode": None, "saved": {}, "saved_random": {}}


def _cpu_mask_builders() -> dict[tuple[Any, str], Any]:
    """megatron-core builds attention masks with a literal ``device="cuda"``. Under activation
    recomputation that code runs inside an autograd Function, where no torch-function mode
    is active, so the mode cannot rewrite it; these two helpers are replaced by CPU ones
    (same values) in every module that imported them."""
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as tutils

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    def get_sliding_window_causal_mask(sq, skv, window_size):
        m = torch.ones(sq, skv, dtype=torch.bool, device="cpu")
        mu = torch.triu(m, diagonal=skv - sq - window_size[0])
        ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
        return ~ml

    saved = {}
    for module in (tutils, fused_softmax):
        for name, fn in (
            ("get_default_causal_mask", get_default_causal_mask),
            ("get_sliding_window_causal_mask", get_sliding_window_causal_mask),
        ):
            if hasattr(module, name):
                saved[(module, name)] = getattr(module, name)
                setattr(module, name, fn)
    return saved


def _cpu_cp_rope_slicers() -> dict[tuple[Any, str], Any]:
    """megatron-core cuts the RoPE angle table for a context-parallel rank with a pinned index
    tensor moved by ``.cuda()`` (``get_pos_emb_on_this_cp_rank``), inside the model's forward
    where our mode is suspended; the same cut (megatron_ct/parallel/context.py's layout) in
    every module that imported it."""
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding

    from megatron_ct.parallel.context import shard_sequence

    def get_pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
        return shard_sequence(pos_emb, seq_dim, cp_group.size(), cp_group.rank())

    saved = {}
    for module in (rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding):
        name = "get_pos_emb_on_this_cp_rank"
        if hasattr(module, name):
            saved[(module, name)] = getattr(module, name)
            setattr(module, name, get_pos_emb_on_this_cp_rank)
    return saved


def _cpu_moe_split_sizes() -> dict[tuple[Any, str], Any]:
    """megatron-core's all-to-all token dispatcher (expert parallelism) moves its split sizes
    to the host as NumPy arrays only when they are CUDA tensors (``maybe_move_tensor_to_cpu``);
    on CPU they stay tensors, which ``all_to_all_single`` refuses as split sizes. The same
    function, with CPU tensors turned into NumPy arrays where asked (the values unchanged)."""
    from megatron.core.transformer.moe import token_dispatcher

    name = "maybe_move_tensor_to_cpu"
    if not hasattr(token_dispatcher, name):
        return {}
    original = getattr(token_dispatcher, name)

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    setattr(token_dispatcher, name, maybe_move_tensor_to_cpu)
    return {(token_dispatcher, name): original}


def _cpu_uneven_first_dim_collectives() -> dict[tuple[Any, str], Any]:
    """With tensor and expert parallelism, megatron-core's MoE dispatcher all-gathers (and in
    the backward reduce-scatters) each rank's routed tokens over the TP ranks with uneven row
    counts, through lists of unequal tensors, which gloo refuses ("invalid tensor size"). On
    CPU tensors the same results come from padded equal-size collectives: every rank's rows
    padded to the largest count, gathered (reduce-scattered), and the padding cut off."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def padded(x: torch.Tensor, rows: int) -> torch.Tensor:
        return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))]) if x.shape[0] < rows else x

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or input_.device.type != "cpu" or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        rows = max(sizes)
        out = input_.new_empty((rows * group.size(), *input_.shape[1:]))  # [world * rows, ...]
        dist.all_gather_into_tensor(out, padded(input_.contiguous(), rows), group=group)
        return torch.cat([out[r * rows : r * rows + n] for r, n in enumerate(sizes)])

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or input_.device.type != "cpu" or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        rows = max(sizes)
        stacked = torch.cat([padded(x, rows) for x in torch.split(input_, sizes, dim=0)])
        out = input_.new_empty((rows, *input_.shape[1:]))
        dist.reduce_scatter_tensor(out, stacked.contiguous(), group=group)
        return out[: sizes[group.rank()]]

    saved = {}
    for name, fn in (
        ("_gather_along_first_dim", _gather_along_first_dim),
        ("_reduce_scatter_along_first_dim", _reduce_scatter_along_first_dim),
    ):
        saved[(mappings, name)] = getattr(mappings, name)
        setattr(mappings, name, fn)
    return saved


_SHARED_GROUPS: dict[tuple, Any] = {}
"""The CPU run's process groups by (ranks, timeout), and the default group they were made in
(``_SHARED_GROUPS[None]``); emptied by :func:`release_shared_process_groups`."""


def _shared_cpu_process_groups() -> dict[tuple[Any, str], Any]:
    """megatron-core creates a process group per parallel dimension and combination (TP, PP,
    DP, CP, EP, TP-DP, TP-PP, embedding, ...: 18 for a rank of a one-process run), many of them
    with the same ranks. Each gloo group runs a network thread that wakes every 10 ms (gloo's
    event loop), so a CPU run carries dozens of threads waking thousands of times a second,
    preempting the compute threads on a small machine (a measured 1-3% of a 2-core step). On
    CPU, groups with the same ranks, backend and options are one process group: collectives
    over it are ordered by the program as before, each group's rank numbering is the same
    (torch numbers a group's ranks in sorted order). Groups asked for with an explicit backend
    (megatron-core's gloo copies, which it destroys one by one) are left alone."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    original = parallel_state.create_group
    cache = _SHARED_GROUPS

    def create_group(ranks=None, timeout=None, backend=None, pg_options=None, **kwargs):
        default = dist.distributed_c10d._get_default_group() if dist.is_initialized() else None
        shareable = (
            ranks is not None
            and backend is None
            and pg_options is None
            and not kwargs.get("use_local_synchronization")
            and default is not None
            and dist.get_backend(default) == "gloo"
        )
        if not shareable:
            return original(ranks=ranks, timeout=timeout, backend=backend, pg_options=pg_options, **kwargs)
        if cache.get(None) is not default:  # a new default group (a test's re-initialisation): new groups
            cache.clear()
            cache[None] = default
        key = (tuple(sorted(ranks)), timeout)
        if key not in cache:
            cache[key] = original(ranks=ranks, timeout=timeout, backend=backend, pg_options=pg_options, **kwargs)
            return cache[key]
        # megatron-core's own bookkeeping, as create_group keeps it (reset by destroy_model_parallel)
        if parallel_state._global_process_group_list is None:
            parallel_state._global_process_group_list = [None]
        if dist.get_rank() in ranks:
            parallel_state._global_process_group_list.append(cache[key])
        return cache[key]

    parallel_state.create_group = create_group
    return {(parallel_state, "create_group"): original}


def release_shared_process_groups() -> None:
    """Drop this module's references to the run's process groups (at teardown, before
    ``destroy_process_group``), so that the groups are freed, and their worker threads joined,
    while the interpreter still runs. A gloo worker thread still holding a finished collective
    at interpreter exit frees its tensors then, needs the GIL, and is ended by Python's
    finalisation inside a destructor: ``terminate called without an active exception``, a
    SIGABRT after the run's work was done (seen in about 1 of 40 four-rank evaluations)."""
    _SHARED_GROUPS.clear()


def _patch_cuda_rng_module() -> dict[str, Any]:
    """megatron-core's tensor_parallel.random keeps its own handle on the CUDA RNG
    setter; point it at the CPU generator so its RNG tracker forks and restores the
    CPU state (the generator CPU kernels actually use)."""
    import megatron.core.tensor_parallel.random as mrandom

    saved = {}
    for name, fn in {
        "_set_cuda_rng_state": lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state),
        "_get_cuda_rng_state": lambda device=None, clone=False, graph_safe=False: torch.get_rng_state(),
    }.items():
        if hasattr(mrandom, name):
            saved[name] = getattr(mrandom, name)
            setattr(mrandom, name, fn)
    return saved


def activate_cpu_device_layer() -> None:
    """Install the CPU device layer for this process (idempotent).

    Call only when training on CPU; the trainer does so when ``device == 'cpu'``.
    """
    with _lock:
        if _state["mode"] is not None:
            return
        # Import megatron-core (and through it torch._dynamo's tables) before patching
        # torch.cuda, so those tables hold the real CUDA functions.
        import megatron.core  # noqa: F401

        if torch.cuda.is_available() and torch.cuda.device_count() > 0 and _gpu_in_use():
            raise RuntimeError("device layer: refusing to map CUDA to CPU in a process that already uses a GPU")
        saved = {}
        for name, fn in _cuda_replacements().items():
            saved[name] = getattr(torch.cuda, name, None)
            setattr(torch.cuda, name, fn)
        _state["saved"] = saved
        _state["saved_random"] = _patch_cuda_rng_module()
        _state["saved_masks"] = {
            **_cpu_mask_builders(),
            **_cpu_cp_rope_slicers(),
            **_cpu_moe_split_sizes(),
            **_cpu_uneven_first_dim_collectives(),
            **_shared_cpu_process_groups(),
        }
        mode = _CudaToCpuMode()
        mode.__enter__()
        _state["mode"] = mode


@contextlib.contextmanager
def rewrites_suspended():
    """Run a block without the CUDA-to-CPU rewriting mode: the model's forward, which places
    tensors by its inputs' and parameters' devices (``torch.cuda.current_device`` stays the CPU,
    and the mask builders are replaced), so the mode only costs a Python call per torch
    operation there (~3% of a CPU step). A no-op when the layer is off, or when another mode
    (a test's :class:`HostSyncCounter`) is on top of ours."""
    mode = _state["mode"]
    current = getattr(torch.overrides, "_get_current_function_mode", lambda: None)()
    if mode is None or current is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


def deactivate_cpu_device_layer() -> None:
    """Remove the CPU device layer (used by tests that switch back)."""
    with _lock:
        mode = _state["mode"]
        if mode is None:
            return
        mode.__exit__(None, None, None)
        for name, fn in _state["saved"].items():
            if fn is None:
                delattr(torch.cuda, name)
            else:
                setattr(torch.cuda, name, fn)
        import megatron.core.tensor_parallel.random as mrandom

        for name, fn in _state["saved_random"].items():
            setattr(mrandom, name, fn)
        for (module, name), fn in _state.get("saved_masks", {}).items():
            setattr(module, name, fn)
        _state.update(mode=None, saved={}, saved_random={}, saved_masks={})


class _CpuWgradAccumulation:
    """apex's ``fused_weight_gradient_mlp_cuda`` for CPU tensors: a linear layer's weight
    gradient is added to its DDP buffer by the GEMM itself (``main_grad += g^T x``), not
    computed into a new tensor that DDP's hook then adds (about 1% of a CPU step). Inputs of a
    lower precision are widened to the buffer's dtype first (exact), as the CUDA kernel
    accumulates in FP32."""

    @staticmethod
    def _accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        if main_grad.device.type != "cpu":
            raise RuntimeError(f"CPU weight-gradient kernel called on a {main_grad.device.type} tensor")
        x = total_input.reshape(-1, total_input.shape[-1]).to(main_grad.dtype)
        g = grad_output.reshape(-1, grad_output.shape[-1]).to(main_grad.dtype)
        main_grad.addmm_(g.t(), x)

    wgrad_gemm_accum_fp32 = _accumulate
    wgrad_gemm_accum_fp16 = _accumulate


def install_cpu_wgrad_accumulation() -> None:
    """Let megatron-core's linear layers take ``gradient_accumulation_fusion`` on CPU, with
    :class:`_CpuWgradAccumulation` (idempotent; where apex's extension is importable it is kept)."""
    from megatron.core.tensor_parallel import layers

    with _lock:
        if not layers._grad_accum_fusion_available:
            layers.fused_weight_gradient_mlp_cuda = _CpuWgradAccumulation
            layers._grad_accum_fusion_available = True


def cpu_device_layer_active() -> bool:
    return _state["mode"] is not None


def _gpu_in_use() -> bool:
    try:
        return torch.cuda.is_initialized()
    except Exception:
        return False


# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_UP_TO = 1 << 30  # bytes: freed blocks up to this size stay in the heap for reuse


def keep_freed_host_memory(environ: dict[str, str] | None = None) -> str:
    """Make glibc's malloc keep freed memory for reuse in this process; returns what was done.

    PyTorch's CPU allocator is malloc. By default glibc serves blocks above a threshold that
    adapts up to 32 MiB with fresh ``mmap`` pages and returns them on free, and gives the top
    of the heap back to the kernel once more than twice that is free there. A training step
    frees most of its activations at the end of each micro-batch's backward, so the next
    forward gets its memory back from the kernel, one zero-filled page fault per 4 KiB: ~7100
    faults per step at ``bench_train.py``'s CPU shape, ~2 us each on this VM, a few percent of
    the step (bench/README.md). With both thresholds at 1 GiB the freed blocks stay in the heap
    and the steady state takes almost none. The process's resident memory then stays at its
    peak, which a training process reaches every micro-batch anyway.

    Nothing is changed where the user chose the allocator: ``MALLOC_*`` or ``GLIBC_TUNABLES``
    in the environment, or jemalloc / tcmalloc / mimalloc preloaded; nor outside glibc.
    """
    env = os.environ if environ is None else environ
    chosen = sorted(k for k in env if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")
    if chosen:
        return f"kept the allocator settings of the environment ({', '.join(chosen)})"
    preload = env.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"kept the preloaded allocator ({preload})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: allocator unchanged"
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return "no mallopt(): allocator unchanged"
    if mallopt(_M_MMAP_THRESHOLD, _KEEP_UP_TO) != 1 or mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO) != 1:
        return "mallopt() refused the thresholds: allocator unchanged"
    return f"glibc malloc keeps freed blocks up to {_KEEP_UP_TO >> 20} MiB for reuse"
