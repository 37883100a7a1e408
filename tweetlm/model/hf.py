"""Hugging Face Llama format, out and in: the one place that knows its names.

    tweetlm export hf runs/small --out export/small            # for transformers, vLLM, llama.cpp's converter
    tweetlm import hf models/SmolLM2-135M --out runs/smol      # continue pretraining an open model on posts

The decoder keeps transformers' weight layout (rotary on split halves, "rotate_half"), so conversion is a
rename, per tensor, no reshaping:

    tweetlm                          Hugging Face
    embed                            model.embed_tokens
    blocks.i.attention_norm          model.layers.i.input_layernorm
    blocks.i.attention.wq wk wv wo   model.layers.i.self_attn.q_proj k_proj v_proj o_proj
    blocks.i.attention.q_norm k_norm model.layers.i.self_attn.q_norm k_norm   (qk_norm models only)
    blocks.i.mlp_norm                model.layers.i.post_attention_layernorm
    blocks.i.mlp.w1 w3 w2            model.layers.i.mlp.gate_proj up_proj down_proj
    norm                             model.norm
    output                           lm_head   (absent when the head is tied to the embedding)

Llama has no norm on queries and keys, so a qk_norm model goes out as Qwen 3 (Qwen3ForCausalLM), which is
exactly Llama plus an RMSNorm over each head's queries and keys before rotary, as ours; import reads both.
"""

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tweetlm.errors import ConfigError, UserError
from tweetlm.model.llama import Llama, ModelConfig
from tweetlm.model.weights import load_model, save_model
from tweetlm.tokenizer.bpe import Tokenizer, adopt

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
_TOP_IN = {hf: ours for ours, hf in _TOP.items()}
_BLOCK_IN = {hf: ours for ours, hf in _BLOCK.items()}
_QK_NORM = {"llama": False, "qwen3": True}  # the model types we read, and whether they norm queries and keys


def _to_hf(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    _, layer, rest = name.split(".", 2)  # blocks.i.rest
    return f"model.layers.{layer}.{_BLOCK[rest]}"


def _from_hf(name: str) -> str:
    if name in _TOP_IN:
        return _TOP_IN[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match is None or match[2] not in _BLOCK_IN:
        raise UserError(f"the checkpoint holds {name}, a weight tweetlm's decoder has no place for: "
                        "only Llama-architecture models (and Qwen 3 without biases) can be imported")
    return f"blocks.{match[1]}.{_BLOCK_IN[match[2]]}"


# ---------------------------------------------------------------- export


def export_hf(run_dir: Path, out: Path, *, dtype: str = "float32") -> None:
    """Write a run's best checkpoint to `out` as config.json, model.safetensors, generation_config.json and the
    tokenizer files: transformers' AutoModelForCausalLM and AutoTokenizer load the folder with no custom code."""
    if dtype not in _DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(_DTYPES)}")
    model, tokenizer = load_model(run_dir)
    cfg = model.config
    if cfg.experts:
        raise UserError(f"{run_dir} is a mixture of experts ({cfg.experts} experts, {cfg.experts_active} active): the export "
                        "to transformers' Mixtral layout lands with issue 15, part 2; dense runs export as Llama today")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"writing {out}/model.safetensors ({dtype})", flush=True)
    tensors = {_to_hf(name): t.to(_DTYPES[dtype]).contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})  # transformers looks for format=pt
    _write_json(out / "config.json", _hf_config(cfg, tokenizer, dtype))
    # a base model ends a post with <|endoftext|>, a chat model a turn with <|end|>: generation stops at either
    _write_json(out / "generation_config.json", {"bos_token_id": tokenizer.boundary_id, "pad_token_id": tokenizer.pad_id,
                                                 "eos_token_id": [tokenizer.boundary_id, tokenizer.token_id("<|end|>")]})
    tokenizer.save(out)
    params = sum(t.numel() for t in tensors.values())
    kind = "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"
    print(f"exported {run_dir} -> {out}: {kind}, {params:,} parameters in {dtype}, vocab {cfg.vocab_size}")


def _hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: str) -> dict:
    config = {
        "architectures": ["Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"],
        "model_type": "qwen3" if cfg.qk_norm else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters; transformers 4 and the tools on it (vLLM, llama.cpp's
        # convert_hf_to_gguf.py) read rope_theta and torch_dtype, which transformers 5 still accepts
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tokenizer.boundary_id,
        "eos_token_id": tokenizer.boundary_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if cfg.qk_norm:  # Qwen 3 has a sliding-window option; it stays off
        config |= {"use_sliding_window": False, "sliding_window": None}
    return config


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------- import


def import_hf(src: Path, out: Path) -> None:
    """Make run folder `out` from a Hugging Face Llama-format model folder `src` (config.json, model.safetensors
    or its shards, tokenizer.json): the tokenizer and a step-0 checkpoint, which load_model and generate read.

    A byte-level BPE tokenizer that lacks tweetlm's special tokens gets them appended (bpe.adopt); the
    embedding and output rows grow to match, the new rows set to the mean of the old ones, so each new
    token starts with an average logit and the model's predictions barely move (Hewitt 2021,
    "Initializing New Word Embeddings for Pretrained Language Models").
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UserError(f"no folder {src}: give a local Hugging Face model folder (tweetlm downloads nothing; "
                        "fetch one first, e.g. `hf download HuggingFaceTB/SmolLM2-135M --local-dir DIR`)")
    if not (src / "config.json").is_file():
        raise UserError(f"{src} has no config.json: give a Hugging Face model folder (config.json, model.safetensors, tokenizer.json)")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty: choose a new --out for the imported run")
    hf = json.loads((src / "config.json").read_text())
    cfg = _model_config(hf)
    tokenizer, added = _read_tokenizer(src)
    state = {_from_hf(name): t.float() for name, t in _read_weights(src).items()
             if not name.endswith("rotary_emb.inv_freq")}  # a buffer older transformers saved; rotary is recomputed
    if cfg.tie_embeddings:
        state.pop("output.weight", None)  # some files store the tied head twice
    rows = cfg.vocab_size
    if tokenizer.vocab_size - len(added) > rows:
        raise UserError(f"{src}/tokenizer.json has {tokenizer.vocab_size - len(added)} tokens but the model only "
                        f"{rows} embedding rows (config.json vocab_size): the two do not belong together")
    if added:
        cfg = dataclasses.replace(cfg, vocab_size=max(rows, tokenizer.vocab_size))
        new_ids = [tokenizer.token_id(name) for name in added]
        for key in ("embed.weight", "output.weight"):
            if key in state:
                state[key] = _with_rows(state[key], cfg.vocab_size, new_ids)

    with torch.device("meta"):
        model = Llama(cfg)
    _check_shapes(model, state, src)
    model.load_state_dict(state, assign=True)
    print(f"writing {out}/checkpoints/step-000000 (float32)", flush=True)
    save_model(model, out)
    tokenizer.save(out)
    _write_json(out / "import.json", {"source": str(src.resolve()), "model_type": hf["model_type"],
                                      "added_special_tokens": added, "vocab_size": [rows, cfg.vocab_size]})
    grown = (f"; the tokenizer gained {', '.join(added)} (ids {', '.join(map(str, new_ids))}), the model's vocabulary "
             f"went {rows} -> {cfg.vocab_size}") if added else ""
    print(f"imported {src} -> {out}: {cfg.depth} layers, dim {cfg.dim}, {sum(t.numel() for t in state.values()):,} "
          f"parameters{grown}")


def _model_config(hf: dict) -> ModelConfig:
    """config.json -> ModelConfig, refusing what the decoder cannot compute exactly, with the field named."""
    kind = hf.get("model_type")
    if kind not in _QK_NORM:
        raise UserError(f"config.json model_type is {kind!r}: tweetlm imports {' and '.join(_QK_NORM)} models")

    def refuse(field: str, why: str):
        raise UserError(f"config.json {field} = {json.dumps(hf.get(field))}: {why}, which tweetlm's decoder does not have")

    if hf.get("quantization_config"):
        refuse("quantization_config", "quantized weights")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "an MLP activation other than silu (SwiGLU)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            refuse(field, "biases")
    for field in ("rope_scaling", "rope_parameters"):  # transformers 4 writes the first, 5 the second
        rope = hf.get(field) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            refuse(field, "scaled rotary positions (as Llama 3.1's)")
    if hf.get("use_sliding_window", hf.get("sliding_window") is not None) or "sliding_attention" in hf.get("layer_types", []):
        refuse("sliding_window", "sliding-window attention")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim * n_heads != hf["hidden_size"]:
        refuse("head_dim", f"a head width other than hidden_size / num_attention_heads = {hf['hidden_size'] // n_heads}")
    rope = hf.get("rope_parameters") or {}
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], depth=hf["num_hidden_layers"], dim=hf["hidden_size"], n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads, ffn_dim=hf["intermediate_size"],
            # transformers' own defaults where a key is absent (LlamaConfig: 2048, 1e-6, theta 10000, untied)
            max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))), qk_norm=_QK_NORM[kind],
            tie_embeddings=hf.get("tie_word_embeddings", False))
    except KeyError as e:
        raise UserError(f"config.json has no {e.args[0]}: is it a complete {kind} config?") from None
    except ConfigError as e:
        raise UserError(f"config.json describes a shape tweetlm refuses: {e}") from None


def _read_tokenizer(src: Path) -> tuple[Tokenizer, list[str]]:
    file = src / "tokenizer.json"
    if not file.is_file():
        spm = " (only a sentencepiece tokenizer.model, which tweetlm does not support)" if (src / "tokenizer.model").exists() else ""
        raise UserError(f"{src} has no tokenizer.json{spm}: tweetlm needs a byte-level BPE tokenizer.json beside the weights")
    return adopt(file.read_bytes().decode())


def _read_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards its index names."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{src} has no model.safetensors: tweetlm reads only safetensors weights (a pytorch_model.bin "
                        "can run code when loaded); save them with transformers' save_pretrained, which writes safetensors")
    weights = {}
    for i, name in enumerate(files):
        print(f"reading {src / name} ({i + 1}/{len(files)})", flush=True)  # an 8B model: ~16 GB, minutes
        weights.update(load_file(src / name))
    return weights


def _with_rows(weight: torch.Tensor, rows: int, new_ids: list[int]) -> torch.Tensor:
    """weight [V, D] grown to [rows, D] with copies of its mean row, which also replaces the rows of new_ids
    (appended tokens can land on rows a model keeps as padding beyond its tokenizer's vocabulary)."""
    mean = weight.mean(dim=0)  # [D]
    grown = torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])
    grown[new_ids] = mean
    return grown


def _check_shapes(model: Llama, state: dict[str, torch.Tensor], src: Path) -> None:
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing = [_to_hf(name) for name in expected if name not in state]
    if missing:
        raise UserError(f"{src} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: "
                        "the weights do not match config.json (is tie_word_embeddings right?)")
    for name, tensor in state.items():
        if name not in expected or tuple(tensor.shape) != expected[name]:
            want = f"config.json implies {list(expected[name])}" if name in expected else "config.json implies no such weight"
            raise UserError(f"{src}: {_to_hf(name)} has shape {list(tensor.shape)}, {want}")
