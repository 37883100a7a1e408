"""The CUDA branches that run without a GPU: which device, dtype, autocast and FSDP policy each verb picks, and
the one-line refusal of --device cuda where PyTorch sees no GPU. tests/test_cuda.py runs the same paths on a GPU."""

import warnings

import pytest
import torch
from helpers import _one_line_error

from tweetlm.device import autocast, inference_dtype, resolve_device
from tweetlm.errors import UserError
from tweetlm.infer.kv_cache import Batch, KVCache
from tweetlm.infer.runner import Runner
from tweetlm.model.llama import Llama
from tweetlm.model.sizing import preset
from tweetlm.train import dist


@pytest.fixture
def gpus(monkeypatch):
    """PyTorch reports `n` GPUs named H200 (nothing is computed on them)."""
    def fake(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    return fake


def test_device_names_resolve_and_cuda_without_a_gpu_is_one_line(gpus, small_tokens, small_tokenizer, tmp_path, capsys):
    gpus(0)  # as in CI (bench/gpu.sh runs this file on a GPU too)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="PyTorch sees no CUDA device: use --device cpu"):
        resolve_device("cuda")
    err = _one_line_error(["train", "--tokens", str(small_tokens), "--out", str(tmp_path / "run"), "--steps", "1",
                           "--device", "cuda"], capsys)
    assert "use --device cpu" in err and not (tmp_path / "run" / "checkpoints").exists()
    err = _one_line_error(["train", "--tokens", str(small_tokens), "--out", str(tmp_path / "run"), "--steps", "1",
                           "--device", "gpu"], capsys)
    assert "--device" in err and "cuda" in err

    gpus(2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_each_rank_takes_its_local_gpu(gpus, monkeypatch):
    gpus(2)
    assert dist.rank_device("cuda") == torch.device("cuda", 0)  # one process: an index, which set_device needs
    assert dist.rank_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "4")  # 2 nodes of 2
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.rank_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(UserError, match="local rank 2 has no GPU: this node has 2"):
        dist.rank_device("auto")
    assert dist.peak_flops(torch.device("cuda", 0)) == (989e12, "NVIDIA H200 bf16 data sheet")


def test_cuda_computes_in_bf16_and_cpu_in_fp32():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast": only its settings are read
        on_gpu = autocast(torch.device("cuda"))
    assert isinstance(on_gpu, torch.autocast) and on_gpu.fast_dtype == torch.bfloat16 and on_gpu.device == "cuda"
    assert not isinstance(autocast(torch.device("cpu")), torch.autocast)
    assert inference_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert inference_dtype(torch.device("cpu")) == torch.float32

    gpu_policy, cpu_policy = dist.mixed_precision(torch.device("cuda")), dist.mixed_precision(torch.device("cpu"))
    assert (gpu_policy.param_dtype, gpu_policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert (cpu_policy.param_dtype, cpu_policy.reduce_dtype) == (None, None)


def test_bf16_runner_the_engine_uses_on_cuda_is_the_model_to_bf16_rounding():
    """The runner's unpacked path (F.linear), in bf16 as on a GPU, run here on the CPU."""
    model = Llama(preset("tiny", vocab_size=300, max_seq_len=64)).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens[None])[0]  # [T, V]
    runner = Runner(model, dtype=torch.bfloat16)
    assert not runner._packed and runner.head.dtype == torch.bfloat16 and model.embed.weight.dtype == torch.float32
    cache = KVCache(model.config, 2, 64, dtype=runner.dtype, device="cpu")
    with torch.inference_mode():
        logits = runner.forward(tokens, Batch(cache, [0], [0], [20], [True]), cache)
    assert logits.dtype == torch.float32
    error = ((logits - reference).norm() / reference.norm()).item()
    assert 1e-4 < error < 5e-2  # bf16's rounding: not fp32's bits, and not more than bf16 explains
