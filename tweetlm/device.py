"""Where a process computes, and in what precision: one place for every verb's --device and for autocast.

    device = resolve_device("auto")        # cuda when PyTorch sees a GPU, else cpu
    with autocast(device): logits = model(tokens)
"""

import contextlib

import torch

from tweetlm.errors import ConfigError, UserError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, *, index: int | None = None) -> torch.device:
    """"auto" -> cuda when there is one, else cpu; "cuda:N" or `index` pick a GPU (train/dist.py gives a rank's
    local rank)."""
    name, _, number = name.partition(":")
    if name not in DEVICES or (number and not (name == "cuda" and number.isdigit())):
        raise ConfigError("device", name + (":" + number if number else ""), f"choose one of {', '.join(DEVICES)} or cuda:N")
    index = int(number) if number else index
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' but PyTorch sees no CUDA device: use --device cpu (or auto)")
    return torch.device(name, index) if name == "cuda" and index is not None else torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (matmuls in bf16, reductions and the loss in fp32); plain fp32 on CPU,
    where bf16 autocast was slower for our shapes and would break bit-exact comparisons with fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inference_dtype(device: torch.device) -> torch.dtype:
    """The dtype the engine decodes in: bf16 on CUDA (a decode step reads every weight once, so half the bytes is
    about twice the speed; vLLM's default for bf16-trained models), fp32 on CPU (the packed oneDNN path that makes
    the engine batch-invariant is fp32, and CPUs without AVX512-BF16 have no fast bf16 matmul)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
