"""The process's place in a run: device, precision, seed, rank helpers and peak FLOPs for MFU.

One process today; this is the module where torchrun's process group, the device mesh and FSDP2/DDP
will live (the only place that reads torchrun's environment variables), so that the loop and the model
never know how many processes there are.
"""

import contextlib
import os
import time

import torch

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


def rank() -> int:
    return int(os.environ.get("RANK", "0"))  # set by torchrun


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when there is one, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device = 'cuda' but PyTorch sees no CUDA device: use --device cpu (or auto)")
    return torch.device(name)


def seed_everything(seed: int, device: torch.device) -> None:
    """Seed torch's global generators and make CPU kernels deterministic. The trainer itself draws from
    explicit generators (init, data order, samples); this covers anything else that draws from the global one."""
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)  # free on CPU; on CUDA it needs CUBLAS_WORKSPACE_CONFIG and costs speed


def autocast(device: torch.device):
    """bf16 autocast on CUDA (matmuls in bf16, reductions and the loss in fp32); plain fp32 on CPU,
    where bf16 autocast was slower for our shapes and would break bit-exact comparisons with fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s, where the figure comes from). CUDA: the data-sheet bf16 figure of a known card, None
    for an unknown one. CPU: no data sheet fits a shared or virtual CPU, so it is measured once here as the
    best fp32 matmul rate of 1024 x 1024 x 1024 products over 0.3 s (the first tries warm the
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
