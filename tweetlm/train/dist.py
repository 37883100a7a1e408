"""The process's place in a run: process group, its device, seed, model wrapping, rank helpers, peak FLOPs.

The only module that reads torchrun's environment variables (RANK, LOCAL_RANK, WORLD_SIZE) or starts process
groups (artifacts/checkpoint.py writes sharded checkpoints with torch.distributed.checkpoint in the group it finds;
tweetlm/device.py resolves devices and autocast for every verb), so the loop and the model
never know how many processes there are:

    python -m tweetlm train ...                                   one process, no process group
    torchrun --nproc-per-node 2 -m tweetlm train ... --parallel ddp   (or fsdp; docs/distributed.md)

A process group runs when there are several processes, or with `parallel = "fsdp"` (even one process: FSDP
then only brings its bf16 mixed-precision policy on CUDA and sharded checkpoints, the same as at any scale).
The backend follows the device: NCCL on CUDA, gloo on CPU. `parallelize` wraps the model:
- ddp: every rank holds the whole model; gradients are averaged (all-reduce) at the last micro-batch of a step;
- fsdp: FSDP2 (`fully_shard`) per block, then at the root: each rank holds 1/world of every weight, gradient
  and optimizer state; weights are all-gathered per block for forward and backward.

When a process or a node of the job dies, the survivors' next collective fails and each prints one line,
`tweetlm: rank R of N lost contact with ...`, before exiting (torchrun's own summary on a surviving node names that
node's rank as the root cause, which only saw the other go). Under `torchrun --max-restarts K` the restarted
processes continue the run from its latest checkpoint by themselves (`restart_count`, train/loop.py).
"""

import contextlib
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from tweetlm.device import resolve_device
from tweetlm.errors import UserError

# Dense bf16 peak FLOP/s from the vendors' data sheets (no sparsity), matched by substring of the device name.
_GPU_PEAK_BF16 = {
    "H200": 989e12,  # NVIDIA H200 SXM
    "H100": 989e12,  # NVIDIA H100 SXM (the PCIe card is 756e12)
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "4090": 165e12,
}

# How long a rank waits in a collective for the others before the job fails instead of hanging. A rank that
# dies is noticed at once, on its node or another: the kernel closes its sockets and the peers' next collective
# fails (two torchrun nodes on one host, kill -9 of one: the other exits 1-3 s later, bench/distributed.py --nodes 2;
# losing the node that hosts the rendezvous ends the other agents as fast), so no timeout is involved. This covers
# a rank that is alive but stuck, and a node that vanishes without closing its connections (power or network loss:
# no FIN or RST). 10 minutes (NCCL's default) leaves room for work that one rank does alone or that ranks finish
# at different times: torch.compile's first step, deleting old checkpoints of a large model.
_TIMEOUT = datetime.timedelta(minutes=10)

# checkpoint_wrapper puts each wrapped block one level down, under this name, in parameter names
_AC_PREFIX = "_checkpoint_wrapped_module."


def rank() -> int:
    return int(os.environ.get("RANK", "0"))  # set by torchrun


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def restart_count() -> int:
    """How many times torchrun has restarted this job's processes after a failure (`--max-restarts`); 0 otherwise."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    """True while a process group runs (several processes, or FSDP): checkpoints are then sharded."""
    return dist.is_available() and dist.is_initialized()


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def rank_device(name: str) -> torch.device:
    """resolve_device(name) for this process, always with a GPU index (torch.cuda.set_device and NCCL need one):
    cuda:N as named, else GPU LOCAL_RANK of this node (GPU 0 for one process)."""
    device = resolve_device(name)
    if device.type != "cuda" or device.index is not None:
        return device
    if _local_rank() >= torch.cuda.device_count():
        raise UserError(f"local rank {_local_rank()} has no GPU: this node has {torch.cuda.device_count()}; "
                        "launch at most that many processes per node (--nproc-per-node)")
    return torch.device("cuda", _local_rank())


@contextlib.contextmanager
def process_group(device: torch.device, parallel: str):
    """Join torchrun's process group for the duration (no group for one process with ddp). An error on any rank
    is reported with the rank's number, and the process exits non-zero, so torchrun ends the whole job."""
    world = world_size()
    if world == 1 and parallel != "fsdp":
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if restart_count() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun (2.13) keeps the store it shares with the processes across restarts, with the first attempt's
        # addresses in it: a restarted process may read a dead peer's and fail to connect (1 restart in 2 on CPU
        # here; PyTorch issues 135712, 167288). Without sharing, each attempt gets a fresh store.
        print0("tweetlm: warning: restarts by torchrun fail at random while it shares its store with the processes: "
               "launch it with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/distributed.md)")
    if world == 1:  # fsdp in one process, with or without torchrun: a group of one needs no rendezvous
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=_TIMEOUT)
    else:
        dist.init_process_group(backend, timeout=_TIMEOUT, device_id=device if device.type == "cuda" else None)
    try:
        yield
    except UserError as e:  # the same mistake is usually seen by every rank: one line each, naming it
        raise UserError(f"rank {rank()} of {world}: {e}" if world > 1 else str(e)) from None
    except BaseException as e:
        if world > 1:
            print(f"\n{_failure(e, world)}", file=sys.stderr, flush=True)  # \n: after a progress bar
        raise  # no goodbye to the others: they may be gone; this process's exit ends the job
    dist.barrier()  # gloo aborts a process that leaves while a peer still talks to it (seen 1 in 5 runs without)
    dist.destroy_process_group()


# What the backends say when a peer's connection closed under a collective: its process or its node died, or the
# network between them failed (gloo's two, as seen when a node is killed; NCCL's).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer",
              "remote process exited or there was a network error")


def _failure(e: BaseException, world: int) -> str:
    """The one line a failing rank prints. A peer's loss is said as such, naming the peer when there is only one,
    so that a survivor's log does not read as the cause (the backends name an address at most)."""
    what = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    if any(s in str(e) for s in _PEER_GONE):
        peer = f"rank {1 - rank()}" if world == 2 else "another rank"
        return (f"tweetlm: rank {rank()} of {world} lost contact with {peer}: it or its node died, or the network "
                f"failed (the first failure in the other nodes' logs is the cause; --resume continues from the last "
                f"checkpoint): {what}")
    return f"tweetlm: rank {rank()} of {world} failed: {what}"


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over ranks, in place; x itself when there is no group."""
    if is_distributed():
        dist.all_reduce(x)
    return x


def agree(value: float) -> float:
    """Rank 0's value on every rank: decisions such as "the time budget is spent" must be the same everywhere,
    or one rank stops while the others wait for it in a collective."""
    if not is_distributed():
        return value
    x = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(x, src=0)
    return x.item()


# ---------------------------------------------------------------- the model across processes


def parallelize(model: nn.Module, *, parallel: str, device: torch.device, compile: bool,
                activation_checkpointing: bool) -> nn.Module:
    """Wrap an initialized model, in place where the wrapper allows; returns what to call for training.
    `model` itself stays the Llama to save, sample from and hand to optimizers (its parameters are DTensor
    shards under fsdp). Order as in torchtitan: activation checkpointing, then data parallelism, then compile."""
    if activation_checkpointing:  # recompute each block's activations in backward: memory O(1 block) for ~1/3 more compute
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block)
    forward = model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        precision = mixed_precision(device)
        # One all-gather per block, freed after use: memory ~ 1/world of the model + 1 block. The root (embedding,
        # tied output head, final norm) reshards after forward too, as in torchtitan: weights are then always
        # the shards outside a forward or backward, also after an evaluation's forward-only pass.
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=precision)
        fully_shard(model, mesh=mesh, mp_policy=precision, reshard_after_forward=True)
    elif is_distributed():
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(forward) if compile else forward


def mixed_precision(device: torch.device):
    """FSDP2's policy: bf16 weights for compute on CUDA, gradients reduced and kept in fp32 (torchtitan's default);
    fp32 throughout on CPU, as autocast (tweetlm/device.py)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def grad_sync(forward: nn.Module, sync: bool):
    """A context for one micro-batch's backward: DDP all-reduces gradients only when `sync` (the step's last
    micro-batch) and accumulates locally before. FSDP reduce-scatters every micro-batch, which keeps gradient
    memory sharded (torchtitan does the same)."""
    ddp = getattr(forward, "_orig_mod", forward)  # under torch.compile
    if not sync and isinstance(ddp, nn.parallel.DistributedDataParallel):
        return ddp.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns it as a plain scalar tensor (under fsdp, torch computes it over
    the shards of all ranks and returns a DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def param_names(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters under their names in Llama ("blocks.0.attention.wq.weight"), whatever parallelize wrapped."""
    return {name.replace(_AC_PREFIX, ""): p for name, p in model.named_parameters()}


def like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A whole tensor as `target` holds it: itself, or this rank's shard when target is an FSDP DTensor.
    Every rank holds `full`, so each cuts its own shard without communication."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
    return full


# ---------------------------------------------------------------- seed and peak FLOP/s


def seed_everything(seed: int, device: torch.device) -> None:
    """Seed torch's global generators and make CPU kernels deterministic. The trainer itself draws from
    explicit generators (init, data order, samples); this covers anything else that draws from the global one."""
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)  # free on CPU; on CUDA it needs CUBLAS_WORKSPACE_CONFIG and costs speed


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s of this process's device, where the figure comes from). CUDA: the data-sheet bf16 figure of
    a known card, None for an unknown one. CPU: no data sheet fits a shared or virtual CPU, so it is measured
    once here as the best fp32 matmul rate of 1024 x 1024 x 1024 products over 0.3 s (the first tries warm the
    threads up; other processes on the machine make single tries slow, so the figure is approximate): MFU on CPU is relative to that."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in _GPU_PEAK_BF16.items():
            if key in name:
                return flops, f"{name} bf16 data sheet"
        return None, f"{name} (not in the peak table)"
    a = torch.full((1024, 1024), 0.5)  # values do not change the speed; no draw from the global RNG
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < 0.3:
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best, "measured fp32 matmul"
