"""Accelerators the planner knows: dense bf16 peak, memory and memory bandwidth, from the vendors' data sheets.

Peaks are dense (no 2:4 sparsity: the data sheets print the sparse figure, twice these, with an asterisk).
Memory is the data sheet's GB (10^9 bytes); the cards hold a little more in practice (an H100 "80GB"
reports 79.6 GiB = 85.5e9 bytes), so fitting against these figures errs on the safe side.
"""

from dataclasses import dataclass

from tweetlm.errors import UserError


@dataclass(frozen=True, kw_only=True)
class Accelerator:
    name: str
    bf16_flops: float  # dense peak FLOP/s
    memory: float  # bytes
    bandwidth: float  # memory bandwidth, bytes/s


ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA A100 Tensor Core GPU data sheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), A100 80GB SXM:
    # BF16 312 TFLOPS (624 sparse), 80GB HBM2e, 2,039 GB/s.
    "a100": Accelerator(name="A100 80GB SXM", bf16_flops=312e12, memory=80e9, bandwidth=2.039e12),
    # NVIDIA H100 Tensor Core GPU data sheet (https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet),
    # H100 SXM: BF16 1,979 TFLOPS with sparsity -> 989 dense, 80GB HBM3, 3.35 TB/s.
    "h100": Accelerator(name="H100 SXM", bf16_flops=989e12, memory=80e9, bandwidth=3.35e12),
    # NVIDIA H200 Tensor Core GPU data sheet (https://www.nvidia.com/en-us/data-center/h200/), H200 SXM:
    # BF16 1,979 TFLOPS with sparsity -> 989 dense (the H100's compute), 141GB HBM3e, 4.8 TB/s.
    "h200": Accelerator(name="H200 SXM", bf16_flops=989e12, memory=141e9, bandwidth=4.8e12),
    # NVIDIA DGX B200 data sheet and HGX B200 spec table (https://www.nvidia.com/en-us/data-center/hgx/), per GPU
    # of an 8-GPU board at 1,000 W: FP16/BF16 4.5 PFLOPS with sparsity -> 2.25 dense, 1,440GB / 8 = 180GB HBM3e,
    # 64 TB/s / 8 = 8 TB/s.
    "b200": Accelerator(name="B200 (HGX, 1000 W)", bf16_flops=2.25e15, memory=180e9, bandwidth=8e12),
}


def accelerator(name: str) -> Accelerator:
    """Look up by key, case-insensitively (h100, H100)."""
    key = name.strip().lower()
    if key not in ACCELERATORS:
        raise UserError(f"unknown gpu {name!r}: choose one of {', '.join(ACCELERATORS)}")
    return ACCELERATORS[key]
