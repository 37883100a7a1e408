"""A model's loss on text: nats per target token and bits per UTF-8 byte, the one arithmetic behind training's
val_loss / val_bpb (tweetlm/train/loop.py) and `tweetlm eval bpb` (tweetlm/eval/bpb.py).
"""

import math
from collections.abc import Callable, Iterable

import torch

from tweetlm.device import autocast
from tweetlm.model.llama import IGNORE_INDEX


@torch.no_grad()
def evaluate(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], token_bytes: torch.Tensor,
             device: torch.device, *, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> dict:
    """{"val_loss": nats per target token, "val_bpb": bits per UTF-8 byte of the targets' text}.
    Every target counts in both, the boundary token too (it carries where a post ends; its text has 0 bytes),
    so bits-per-byte is the size the model would compress the text to, comparable across tokenizers.
    Targets equal to IGNORE_INDEX count in neither. With several processes, each scores its share of the
    val set and `reduce` sums the counts over ranks (the trainer passes its all-reduce)."""
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = torch.zeros((), dtype=torch.int64, device=device)
    n_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device):
            losses = model(inputs, targets, reduction="none")  # [B, T], 0 where ignored
        counted = targets != IGNORE_INDEX
        nats += losses.double().sum()
        n_tokens += counted.sum()
        n_bytes += torch.where(counted, token_bytes[targets.clamp(min=0)], 0).sum()
    model.train()
    nats, n_tokens, n_bytes = (reduce(x) for x in (nats, n_tokens, n_bytes))
    return {"val_loss": (nats / n_tokens).item(), "val_bpb": (nats / (math.log(2) * n_bytes)).item()}
