"""Hugging Face formats, out and in: the one place that knows their names.

    tweetlm export hf runs/small --out export/small            # for transformers, vLLM, llama.cpp's converter
    tweetlm import hf models/SmolLM2-135M --out runs/smol      # continue pretraining an open model on posts

The decoder keeps transformers' weight layout (rotary on split halves, "rotate_half"), so conversion is a
rename, per tensor, no reshaping (an MoE's stacked experts are split into one tensor per expert):

    tweetlm                          Hugging Face
    embed                            model.embed_tokens
    blocks.i.attention_norm          model.layers.i.input_layernorm
    blocks.i.attention.wq wk wv wo   model.layers.i.self_attn.q_proj k_proj v_proj o_proj
    blocks.i.attention.q_norm k_norm model.layers.i.self_attn.q_norm k_norm   (qk_norm models only)
    blocks.i.mlp_norm                model.layers.i.post_attention_layernorm
    blocks.i.mlp.w1 w3 w2            model.layers.i.mlp.gate_proj up_proj down_proj
    norm                             model.norm
    output                           lm_head   (absent when the head is tied to the embedding)
  a mixture of experts, Mixtral:
    blocks.i.mlp.router              model.layers.i.block_sparse_moe.gate
    blocks.i.mlp.w1 w3 w2 [e]        model.layers.i.block_sparse_moe.experts.e.w1 w3 w2
  a mixture of experts with qk_norm, Qwen 3 MoE:
    blocks.i.mlp.router              model.layers.i.mlp.gate
    blocks.i.mlp.w1 w3 w2 [e]        model.layers.i.mlp.experts.e.gate_proj up_proj down_proj

Llama has no norm on queries and keys, so a qk_norm model goes out as Qwen 3 (Qwen3ForCausalLM), which is
exactly Llama plus an RMSNorm over each head's queries and keys before rotary, as ours; import reads both.
A mixture of experts goes out as Mixtral (MixtralForCausalLM), whose routing is ours (softmax over the experts in
fp32, top k, the k weights renormalised to sum to 1), or with qk_norm as Qwen 3 MoE, the same routing when
norm_topk_prob is true (written so; a folder without it is refused on import). Both store one tensor per expert
(transformers 5 fuses them when it loads, and splits them again when it saves). Shared experts have no place in
either (Qwen 2 MoE's shared expert has a gate of its own, DeepSeek-V3 routes by sigmoid): such a run is refused.
"""

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tweetlm.errors import ConfigError, UserError
from tweetlm.model.llama import Llama, ModelConfig
from tweetlm.model.weights import load_model, save_model
from tweetlm.tokenizer.bpe import Tokenizer, adopt

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM"}  # the model types we write and read
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_ATTENTION = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
_QK_NORM = {"attention.q_norm.weight": "self_attn.q_norm.weight", "attention.k_norm.weight": "self_attn.k_norm.weight"}
_MLP = {  # per model type; {e}: an expert's index (ours: blocks.i.mlp.w1.e, one expert of the stacked blocks.i.mlp.w1)
    "llama": {"mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w3.weight": "mlp.up_proj.weight", "mlp.w2.weight": "mlp.down_proj.weight"},
    "mixtral": {"mlp.router.weight": "block_sparse_moe.gate.weight", "mlp.w1.{e}": "block_sparse_moe.experts.{e}.w1.weight",
                "mlp.w3.{e}": "block_sparse_moe.experts.{e}.w3.weight", "mlp.w2.{e}": "block_sparse_moe.experts.{e}.w2.weight"},
    "qwen3_moe": {"mlp.router.weight": "mlp.gate.weight", "mlp.w1.{e}": "mlp.experts.{e}.gate_proj.weight",
                  "mlp.w3.{e}": "mlp.experts.{e}.up_proj.weight", "mlp.w2.{e}": "mlp.experts.{e}.down_proj.weight"},
}
_MLP["qwen3"] = _MLP["llama"]
_EXPERTS = ("w1", "w3", "w2")  # an MoE block's stacked expert weights


def _model_type(cfg: ModelConfig) -> str:
    if cfg.experts:
        return "qwen3_moe" if cfg.qk_norm else "mixtral"
    return "qwen3" if cfg.qk_norm else "llama"


def _hf_names(cfg: ModelConfig) -> dict[str, str]:
    """Every tensor of this shape, our name -> its Hugging Face name (an MoE's experts one by one, see _unstack)."""
    names = {ours: hf for ours, hf in _TOP.items() if ours != "output.weight" or not cfg.tie_embeddings}
    block = _ATTENTION | (_QK_NORM if cfg.qk_norm else {})
    for i in range(cfg.depth):
        names |= {f"blocks.{i}.{ours}": f"model.layers.{i}.{hf}" for ours, hf in block.items()}
        for ours, hf in _MLP[_model_type(cfg)].items():
            for e in range(cfg.experts) if "{e}" in ours else [None]:
                names[f"blocks.{i}.{ours.format(e=e)}"] = f"model.layers.{i}.{hf.format(e=e)}"
    return names


def _unstack(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An MoE's stacked experts [E, ...] as one tensor per expert (blocks.i.mlp.w1 -> blocks.i.mlp.w1.e)."""
    if not cfg.experts:
        return state
    out = {}
    for name, t in state.items():
        if name.endswith(tuple(f".mlp.{w}" for w in _EXPERTS)):
            out |= {f"{name}.{e}": expert for e, expert in enumerate(t.unbind())}
        else:
            out[name] = t
    return out


def _stack(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """_unstack's inverse."""
    for i in range(cfg.depth):
        for w in _EXPERTS if cfg.experts else ():
            state[f"blocks.{i}.mlp.{w}"] = torch.stack([state.pop(f"blocks.{i}.mlp.{w}.{e}") for e in range(cfg.experts)])
    return state


# ---------------------------------------------------------------- export


def export_hf(run_dir: Path, out: Path, *, dtype: str = "float32") -> None:
    """Write a run's best checkpoint to `out` as config.json, model.safetensors, generation_config.json and the
    tokenizer files: transformers' AutoModelForCausalLM and AutoTokenizer load the folder with no custom code."""
    if dtype not in _DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(_DTYPES)}")
    model, tokenizer = load_model(run_dir)
    cfg = model.config
    if cfg.shared_experts:
        raise UserError(f"{run_dir} has {cfg.shared_experts} shared expert(s): transformers' Mixtral and Qwen 3 MoE have no "
                        "place for them (see tweetlm/model/hf.py); only runs with routed experts alone export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"writing {out}/model.safetensors ({dtype})", flush=True)
    names = _hf_names(cfg)
    tensors = {names[name]: t.to(_DTYPES[dtype]).contiguous() for name, t in _unstack(model.state_dict(), cfg).items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})  # transformers looks for format=pt
    _write_json(out / "config.json", _hf_config(cfg, tokenizer, dtype))
    # a base model ends a post with <|endoftext|>, a chat model a turn with <|end|>: generation stops at either
    _write_json(out / "generation_config.json", {"bos_token_id": tokenizer.boundary_id, "pad_token_id": tokenizer.pad_id,
                                                 "eos_token_id": [tokenizer.boundary_id, tokenizer.token_id("<|end|>")]})
    tokenizer.save(out)
    params = sum(t.numel() for t in tensors.values())
    print(f"exported {run_dir} -> {out}: {_ARCHITECTURES[_model_type(cfg)]}, {params:,} parameters in {dtype}, vocab {cfg.vocab_size}")


def _hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: str) -> dict:
    kind = _model_type(cfg)
    config = {
        "architectures": [_ARCHITECTURES[kind]],
        "model_type": kind,
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
    if cfg.qk_norm or cfg.experts:  # Qwen 3 and Mixtral have a sliding-window option; it stays off
        config |= {"use_sliding_window": False, "sliding_window": None}
    if kind == "mixtral":
        config |= {"intermediate_size": cfg.expert_width, "num_local_experts": cfg.experts,
                   "num_experts_per_tok": cfg.experts_active, "router_jitter_noise": 0.0}
    if kind == "qwen3_moe":  # every layer an MoE one (no mlp_only_layers), the top k weights renormalised as ours
        config |= {"moe_intermediate_size": cfg.expert_width, "num_experts": cfg.experts,
                   "num_experts_per_tok": cfg.experts_active, "norm_topk_prob": True, "decoder_sparse_step": 1,
                   "mlp_only_layers": []}
    if cfg.experts:
        config |= {"router_aux_loss_coef": cfg.router_aux_coef, "output_router_logits": False}
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
    ours = {hf: name for name, hf in _hf_names(cfg).items()}
    state = {}
    for name, t in _read_weights(src).items():
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue  # a buffer older transformers saved (rotary is recomputed); a tied head some files store twice
        if name not in ours:
            raise UserError(f"the checkpoint holds {name}, a weight tweetlm's decoder has no place for: only "
                            f"{', '.join(_ARCHITECTURES.values())} models without biases can be imported")
        state[ours[name]] = t.float()
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
    model.load_state_dict(_stack(state, cfg), assign=True)
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
    if kind not in _ARCHITECTURES:
        raise UserError(f"config.json model_type is {kind!r}: tweetlm imports {', '.join(_ARCHITECTURES)} models")

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
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))), qk_norm=kind.startswith("qwen3"),
            tie_embeddings=hf.get("tie_word_embeddings", False), **_experts(hf))
    except KeyError as e:
        raise UserError(f"config.json has no {e.args[0]}: is it a complete {kind} config?") from None
    except ConfigError as e:
        raise UserError(f"config.json describes a shape tweetlm refuses: {e}") from None


def _experts(hf: dict) -> dict:
    """A Mixtral or Qwen 3 MoE config.json's experts as ModelConfig fields (none for a dense model)."""
    kind = hf["model_type"]
    if kind == "qwen3_moe":
        if not hf.get("norm_topk_prob", False):
            raise UserError("config.json norm_topk_prob = false: routing weights not renormalised over the top k, "
                            "which tweetlm's decoder does not have")
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise UserError("config.json mlp_only_layers / decoder_sparse_step: dense layers among the MoE ones, "
                            "which tweetlm's decoder does not have")
        fields = {"experts": hf["num_experts"], "expert_dim": hf["moe_intermediate_size"]}
    elif kind == "mixtral":
        fields = {"experts": hf["num_local_experts"]}  # its experts' width is intermediate_size, our ffn_dim
    else:
        return {}
    return fields | {"experts_active": hf["num_experts_per_tok"], "router_aux_coef": hf.get("router_aux_loss_coef", 0.01)}


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
    """state: our names, the experts one by one, as _hf_names lists them."""
    cfg = model.config
    names = _hf_names(cfg)
    expected = {name: tuple(t.shape) for name, t in _unstack(model.state_dict(), cfg).items()}
    missing = [names[name] for name in expected if name not in state]
    if missing:
        raise UserError(f"{src} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: "
                        "the weights do not match config.json (is tie_word_embeddings right?)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise UserError(f"{src}: {names[name]} has shape {list(tensor.shape)}, config.json implies {list(expected[name])}")
