"""`tweetlm demo`: the whole pipeline on the bundled tweets (or --data), in about 5 minutes on 2 CPU cores.

prepare -> tokenizer train -> tokenize -> train (small preset, time budget) -> val bits-per-byte -> posts.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tweetlm.data.fetch import fetch_tweeteval
from tweetlm.data.prepare import PrepareConfig, prepare
from tweetlm.infer.generate import GenerateConfig, generate
from tweetlm.model.weights import load_model
from tweetlm.tokenizer.shards import TokenizeConfig, tokenize
from tweetlm.tokenizer.trainer import TokenizerConfig, train_tokenizer
from tweetlm.train.config import load_config
from tweetlm.train.loop import train


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    data: tuple[str, ...]  # inputs for `data prepare`; empty: the shared tweets, else TweetEval fetched
    shared: Path  # ../shared/data of a developer checkout
    out: Path = Path("work/demo")
    minutes: float = 5.0
    vocab_size: int = 8192
    workers: int = 2


def _default_inputs(cfg: DemoConfig) -> tuple[str, ...]:
    if cfg.shared.is_dir():
        return (str(cfg.shared / "tweeteval/**/*_text.txt"), str(cfg.shared / "xlm-t/*/*_text.txt"),
                str(cfg.shared / "twitter-api-v2"))
    print(f"{cfg.shared} not found: fetching the public TweetEval files instead")
    fetch_tweeteval(out=cfg.out / "tweeteval")
    return (str(cfg.out / "tweeteval/**/*_text.txt"),)


def demo(cfg: DemoConfig) -> dict:
    inputs = cfg.data or _default_inputs(cfg)
    corpus, tok, tokens, run = (cfg.out / name for name in ("corpus", "tokenizer", "tokens", "run"))
    print("== 1/5 data prepare")
    prepare(PrepareConfig(inputs=inputs, out=corpus, workers=cfg.workers))
    print("== 2/5 tokenizer train")
    train_tokenizer(TokenizerConfig(corpus=corpus, out=tok, vocab_size=cfg.vocab_size))
    print("== 3/5 data tokenize")
    tokenize(TokenizeConfig(corpus=corpus, tokenizer=tok, out=tokens, workers=1))
    print(f"== 4/5 train (small preset, {cfg.minutes:g} minutes)")
    final = train(load_config(None, {
        "tokens": tokens, "tokenizer": tok, "out": run, "time_budget": cfg.minutes, "batch_tokens": 4096,
        "micro_batch": 16, "model.preset": "small", "model.seq_len": 256, "eval.every": 100,
        "eval.samples_every": 200, "checkpoint.every": 100,
    }), resume=(run / "config.toml").is_file())
    print("== 5/5 generate")
    model, tokenizer = load_model(run)
    for prompt in ("", "I love", "Monday mornings", "@user the game last night"):
        text = "".join(piece for _, piece in generate(model, tokenizer, GenerateConfig(
            run=run, prompt=prompt, seed=0, sampling=dataclasses.replace(GenerateConfig.sampling, max_tokens=40))))
        print(f"  > {prompt}{text}")
    print(f"\nval bits-per-byte: {final.get('val_bpb', float('nan')):.3f}   (run folder: {run})")
    print("go further:\n"
          f"  tweetlm generate {run} --prompt 'Good morning' --num-samples 3\n"
          f"  tweetlm serve {run}            # OpenAI-compatible API + web chat at http://127.0.0.1:8000/\n"
          f"  tweetlm export hf {run} --out {run.parent / 'hf'}   # for transformers, vLLM, llama.cpp\n"
          f"  tweetlm train --tokens {tokens} --out runs/125m --preset 125m --time-budget 60\n"
          f"  tweetlm plan --gpus 64 --gpu h100 --days 7 --tokens {tokens}")
    return final
