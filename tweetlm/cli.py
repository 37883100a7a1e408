"""tweetlm VERB ...: a thin layer that parses flags and calls one stage function per verb.

Stage modules are imported inside each verb, so `tweetlm --help` stays instant.
A UserError from any stage becomes one line on stderr and exit code 2.
"""

import argparse
import os
import sys
from pathlib import Path

from tweetlm.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit 2 (argparse prints the whole usage)."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _group(sub, name: str, help: str):
    """A verb with actions under it (`tweetlm data prepare`): returns the subparsers to add the actions to."""
    group = sub.add_parser(name, help=help, formatter_class=_formatter)
    return group.add_subparsers(dest="action", required=True, metavar="ACTION")


def _verb(sub, name: str, help: str, example: str, run) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=f"{help}\n\nexample:\n  {example}", formatter_class=_formatter)
    p.set_defaults(run=run)
    return p


# ---------------------------------------------------------------- data


def _data_prepare(a):
    from tweetlm.data.prepare import PrepareConfig, prepare

    toxic, threshold = _safety_spec(a.drop_toxic) if a.drop_toxic else (None, None)
    prepare(PrepareConfig(
        inputs=tuple(a.inputs), out=Path(a.out), workers=a.workers, lang=tuple(c.strip() for c in a.lang.split(",") if c.strip()),
        min_chars=a.min_chars, max_chars=a.max_chars, keep_reposts=a.keep_reposts, drop_spam=not a.keep_spam,
        drop_top_authors=a.drop_top_authors, near_dup_threshold=a.near_dup, near_dup_mb=a.near_dup_mb, val_ratio=a.val_ratio,
        test_ratio=a.test_ratio, mentions=not a.keep_mentions, links=not a.keep_links, seed=a.seed,
        drop_toxic=toxic, toxic_threshold=threshold,
    ))


def _data_tokenize(a):
    from tweetlm.tokenizer.shards import TokenizeConfig, tokenize

    tokenize(TokenizeConfig(corpus=Path(a.corpus), tokenizer=Path(a.tokenizer), out=Path(a.out), workers=a.workers))


def _data_fetch(a):
    from tweetlm.data.fetch import fetch_tweeteval

    fetch_tweeteval(out=Path(a.out), local=Path(a.from_dir) if a.from_dir else None)


def _data_threads(a):
    from tweetlm.data.threads import ThreadsConfig, threads

    threads(ThreadsConfig(corpus=Path(a.corpus), out=Path(a.out), split=a.split))


def _data_tasks(a):
    from tweetlm.data.tasks import CORPUS_TASKS, TASKS, TasksConfig, tasks

    # default: every task the inputs allow (tone needs TweetEval)
    names = a.tasks.split(",") if a.tasks else TASKS if a.tweeteval else CORPUS_TASKS
    tasks(TasksConfig(corpus=Path(a.corpus), out=Path(a.out), tweeteval=Path(a.tweeteval) if a.tweeteval else None,
                      split=a.split, tasks=tuple(t.strip() for t in names if t.strip()), seed=a.seed))


def _add_data(sub):
    dsub = _group(sub, "data", "read, clean and tokenize posts")

    p = _verb(dsub, "prepare", "read raw posts (any supported format), clean, filter, dedup and split them into a Parquet corpus",
              "tweetlm data prepare ../shared/data/twitter-api-v2 'dumps/*.jsonl.zst' --out work/corpus --workers 2",
              _data_prepare)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs (plain, .gz, .zst, .bz2)")
    p.add_argument("--out", required=True, metavar="CORPUS", help="output folder for Parquet shards and report.json")
    p.add_argument("--workers", type=int, default=1, help="processes, work split by file (default 1)")
    p.add_argument("--lang", default="", metavar="CODES", help="keep only these languages (py3langid), e.g. en,fr; default keeps all")
    p.add_argument("--min-chars", type=int, default=10, help="drop posts shorter than this after normalization (default 10)")
    p.add_argument("--max-chars", type=int, default=4000, help="drop posts longer than this after normalization (default 4000)")
    p.add_argument("--keep-reposts", action="store_true", help="keep reposts (retweets); dropped by default")
    p.add_argument("--keep-spam", action="store_true", help="keep posts that are mostly hashtags, mentions or links")
    p.add_argument("--drop-top-authors", type=float, default=0.0, metavar="FRACTION",
                   help="drop the most prolific FRACTION of authors as likely bots, e.g. 0.01 as TimeLMs (default 0: off)")
    p.add_argument("--near-dup", type=float, default=0.8, metavar="JACCARD",
                   help="drop near duplicates at this MinHash Jaccard similarity; 0 turns it off (default 0.8)")
    p.add_argument("--near-dup-mb", type=int, default=128, metavar="MB",
                   help="fixed memory of the near-duplicate index; copies further apart than about "
                        "15,000 posts per MB start to be missed (default 128: 1.9M posts)")
    p.add_argument("--val-ratio", type=float, default=0.05, help="share of conversations in val (default 0.05)")
    p.add_argument("--test-ratio", type=float, default=0.05, help="share of conversations in test (default 0.05)")
    p.add_argument("--keep-mentions", action="store_true", help="keep @handles (default: replace with @user)")
    p.add_argument("--keep-links", action="store_true", help="keep URLs (default: replace with http)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split hash and MinHash (default 0)")
    p.add_argument("--drop-toxic", metavar="SAFETY[:THRESHOLD]", help="drop posts that a `tweetlm safety train` "
                   "classifier scores toxic, at its own threshold or THRESHOLD (in (0, 1])")

    p = _verb(dsub, "tokenize", "turn a corpus into memory-mappable token shards per split",
              "tweetlm data tokenize work/corpus --tokenizer work/tokenizer --out work/tokens --workers 2", _data_tokenize)
    p.add_argument("corpus", metavar="CORPUS", help="a folder written by `tweetlm data prepare`")
    p.add_argument("--tokenizer", required=True, metavar="TOKENIZER", help="a folder written by `tweetlm tokenizer train`")
    p.add_argument("--out", required=True, metavar="TOKENS", help="output folder for the token shards and index.json")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")

    p = _verb(dsub, "fetch", "get the public TweetEval text files (from GitHub, or a local copy with --from)",
              "tweetlm data fetch --from ../shared/data/tweeteval --out work/tweeteval", _data_fetch)
    p.add_argument("--out", required=True, metavar="DIR", help="where to put the files")
    p.add_argument("--from", dest="from_dir", metavar="DIR", help="copy from this local TweetEval folder instead of downloading")

    p = _verb(dsub, "threads", "rebuild reply threads and write each root-to-leaf path as a chat conversation (OpenAI messages, JSONL)",
              "tweetlm data threads work/corpus --out work/conversations.jsonl --split train", _data_threads)
    p.add_argument("corpus", metavar="CORPUS", help="a folder written by `tweetlm data prepare`")
    p.add_argument("--out", required=True, metavar="CONVERSATIONS.jsonl", help="output file, one conversation a line")
    p.add_argument("--split", default="train", choices=("train", "val", "test", "all"), help="which split's threads (default train)")

    p = _verb(dsub, "tasks", "make the assistant's task conversations from the corpus (compose, reply, summarize) and "
              "TweetEval (tone), in the JSONL of `data threads` plus a task field",
              "tweetlm data tasks work/corpus --out work/tasks.jsonl --tweeteval ../shared/data/tweeteval", _data_tasks)
    p.add_argument("corpus", metavar="CORPUS", help="a folder written by `tweetlm data prepare`")
    p.add_argument("--out", required=True, metavar="TASKS.jsonl", help="output file, one conversation a line")
    p.add_argument("--tweeteval", metavar="DIR", help="TweetEval's datasets/ folder, for the tone task")
    p.add_argument("--split", default="train", choices=("train", "val", "test"), help="corpus and TweetEval split (default train)")
    p.add_argument("--tasks", metavar="TASKS", help="comma-separated among compose,reply,summarize,tone "
                   "(default: all four with --tweeteval, else the first three)")
    p.add_argument("--seed", type=int, default=0, help="seed of each compose prompt's kind and topic length (default 0)")


# ---------------------------------------------------------------- tokenizer


def _tokenizer_train(a):
    from tweetlm.tokenizer.trainer import TokenizerConfig, train_tokenizer

    train_tokenizer(TokenizerConfig(corpus=Path(a.corpus), out=Path(a.out), vocab_size=a.vocab_size))


def _add_tokenizer(sub):
    tsub = _group(sub, "tokenizer", "train a byte-level BPE tokenizer")
    p = _verb(tsub, "train", "train byte-level BPE on the corpus's train split; prints bytes per token on val",
              "tweetlm tokenizer train work/corpus --vocab-size 8192 --out work/tokenizer", _tokenizer_train)
    p.add_argument("corpus", metavar="CORPUS", help="a folder written by `tweetlm data prepare`")
    p.add_argument("--vocab-size", type=int, default=16384, help="vocabulary size, special tokens included (default 16384)")
    p.add_argument("--out", required=True, metavar="TOKENIZER", help="output folder for tokenizer.json")


# ---------------------------------------------------------------- train


def _train(a):
    from tweetlm.train.config import load_config, parse_set
    from tweetlm.train.loop import train

    # --resume starts from the run's own resolved config; flags and --set override either base
    base = Path(a.config) if a.config else Path(a.out) / "config.toml" if a.resume else None
    overrides = {"tokens": a.tokens, "tokenizer": a.tokenizer, "init_from": a.init_from, "out": a.out, "model.preset": a.preset,
                 "model.depth": a.depth, "steps": a.steps, "time_budget": a.time_budget, "seed": a.seed,
                 "device": a.device, "compile": a.compile or None, "parallel": a.parallel, **parse_set(a.set)}
    train(load_config(base, overrides), resume=a.resume)


def _add_train(sub):
    p = _verb(sub, "train", "train a model on token shards; writes config, checkpoints, metrics.jsonl, loss.png and samples to RUN",
              "tweetlm train --tokens work/tokens --out runs/small --preset small --time-budget 5\n"
              "  tweetlm train --tokens work/smol-tokens --out runs/smol-posts --init-from runs/smol --steps 1000\n"
              "  torchrun --standalone --nproc-per-node 8 -m tweetlm train --tokens work/tokens "
              "--out runs/1b --preset 1b --steps 20000 --parallel fsdp --set optim.name=adamw --set optim.lr=0.003",
              _train)
    p.add_argument("--tokens", metavar="TOKENS", help="token shards from `tweetlm data tokenize`")
    p.add_argument("--tokenizer", metavar="TOKENIZER", help="the tokenizer the shards were made with "
                   "(default: the one `data tokenize` saved beside them)")
    p.add_argument("--init-from", metavar="RUN", help="start from another run's best checkpoint (or an `import hf` run): "
                   "its shape and weights, fresh optimizers")
    p.add_argument("--out", required=True, metavar="RUN", help="the run folder")
    p.add_argument("--config", metavar="FILE.toml", help="run config (see configs/); flags below override it")
    p.add_argument("--preset", help="model shape by name: tiny, small, 125m, 1b, 8b (default tiny)")
    p.add_argument("--depth", type=int, help="model shape by depth (width and heads follow); replaces --preset")
    p.add_argument("--steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--time-budget", type=float, metavar="MINUTES", help="stop after this much training time; "
                   "the LR schedule then follows time (with --steps too: whichever ends first)")
    p.add_argument("--seed", type=int, help="seed of weights, data order and samples (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto: cuda when there is one")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), help="under torchrun: replicate the model (ddp, the default) "
                   "or shard it (fsdp, FSDP2; needs --set optim.name=adamw); see docs/distributed.md")
    p.add_argument("--resume", action="store_true", help="continue RUN from its latest checkpoint, with its config.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set optim.lr=0.01 --set model.seq_len=128 (repeatable)")


def _sft(a):
    from tweetlm.train.config import parse_set
    from tweetlm.train.sft import SftConfig, Source, sft

    overrides = {"steps": a.steps, "time_budget": a.time_budget, "seed": a.seed, **parse_set(a.set)}
    sft(SftConfig(base=Path(a.base), data=tuple(Source.parse(d) for d in a.data), out=Path(a.out),
                  val=Path(a.val) if a.val else None, val_ratio=a.val_ratio, overrides=overrides), resume=a.resume)


def _add_sft(sub):
    p = _verb(sub, "sft", "fine-tune a run into a chat model on conversations (loss on the assistant's messages only); "
              "prints and saves to RUN/sft.json the held-out assistant bits-per-byte before and after",
              "tweetlm data threads work/demo/corpus --out work/threads.jsonl --split all\n"
              "  tweetlm sft work/demo/run --data work/threads.jsonl --out work/demo/chat --steps 200\n"
              "  tweetlm sft runs/small --data threads.jsonl --data tasks.jsonl:0.5 --out runs/small-chat --time-budget 10",
              _sft)
    p.add_argument("base", metavar="BASE", help="the run to fine-tune (its best checkpoint), or one checkpoint folder")
    p.add_argument("--data", action="append", required=True, metavar="FILE[:WEIGHT]",
                   help="conversations, JSONL of {\"messages\": [...]} as `data threads` writes (repeatable); files "
                   "are mixed in proportion to their weights (default 1)")
    p.add_argument("--out", required=True, metavar="RUN", help="the new run folder")
    p.add_argument("--steps", type=int, help="stop after this many optimizer steps (default 300)")
    p.add_argument("--time-budget", type=float, metavar="MINUTES", help="stop after this much training time "
                   "(with --steps too: whichever ends first)")
    p.add_argument("--val-ratio", type=float, metavar="R", help="share of each --data file held out to measure "
                   "bits-per-byte, by a hash of its conversation_id or thread_id (default 0.05)")
    p.add_argument("--val", metavar="FILE", help="held-out conversations instead of --val-ratio")
    p.add_argument("--seed", type=int, help="seed of the data order and mix (default 0)")
    p.add_argument("--resume", action="store_true", help="continue RUN from its latest checkpoint, with its config.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any `train` config key, e.g. --set optim.lr=0.01 --set device=cpu (repeatable)")


# ---------------------------------------------------------------- eval and safety


def _eval_tweeteval(a):
    from tweetlm.eval.tweeteval import TweetEvalConfig, tweeteval

    out = a.out or (Path(a.run_dir) / f"tweeteval-{a.split}" if a.run_dir else Path(f"tweeteval-{a.split}"))
    tweeteval(TweetEvalConfig(data=Path(a.data), out=Path(out), split=a.split, run=Path(a.run_dir) if a.run_dir else None,
                              model=a.model, tasks=tuple(t.strip() for t in a.tasks.split(",") if t.strip()),
                              max_train_examples=a.max_train_examples, seed=a.seed, epochs=a.epochs, lr=a.lr,
                              batch_size=a.batch_size, device=a.device))


def _eval_bpb(a):
    from tweetlm.eval.bpb import BpbConfig, bpb

    bpb(BpbConfig(run=Path(a.run_dir), text=Path(a.text) if a.text else None, corpus=Path(a.corpus) if a.corpus else None,
                  split=a.split, window=a.window, batch_size=a.batch_size, device=a.device))


def _safety_spec(spec: str) -> tuple[Path, float | None]:
    from tweetlm.artifacts.safety import parse_spec

    return parse_spec(spec)


def _safety_train(a):
    from tweetlm.eval.safety import SafetyConfig, train_safety

    train_safety(SafetyConfig(data=Path(a.data), out=Path(a.out), max_train_examples=a.max_train_examples, seed=a.seed))


def _add_eval(sub):
    esub = _group(sub, "eval", "evaluate: TweetEval classification, bits per byte")
    p = _verb(esub, "tweeteval", "TweetEval's six tasks: fine-tune a run per task (beside the TF-IDF floor), "
              "predict a split in the benchmark's format, official metrics beside the published rows",
              "tweetlm eval tweeteval work/demo/run --data ../shared/data/tweeteval --split val", _eval_tweeteval)
    p.add_argument("run_dir", nargs="?", metavar="RUN", help="a run folder (or checkpoint) to fine-tune with a "
                   "classification head per task; its row is named after the folder")
    p.add_argument("--model", choices=("tfidf",), help="a built-in model instead of RUN: tfidf, TF-IDF n-grams + "
                   "logistic regression (the floor baseline)")
    p.add_argument("--data", required=True, metavar="DIR", help="laid out as TweetEval's datasets/ folder "
                   "(emoji/, emotion/, ... stance/TARGET/), e.g. ../shared/data/tweeteval")
    p.add_argument("--split", default="val", choices=("val", "test"), help="the split to predict and score (default val)")
    p.add_argument("--tasks", default="emoji,emotion,hate,irony,offensive,stance", metavar="TASKS",
                   help="comma-separated (default: all six)")
    p.add_argument("--out", metavar="DIR", help="predictions (DIR/MODEL/TASK.txt) and scores.json "
                   "(default RUN/tweeteval-SPLIT, or ./tweeteval-SPLIT with --model)")
    p.add_argument("--max-train-examples", type=int, metavar="N", help="train on a seeded sample of N posts per task, "
                   "for quick runs")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and training (default 0)")
    p.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs per task; val picks the best (default 6)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak learning rate, AdamW (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=32, help="fine-tuning posts per step (default 32)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to fine-tune (default auto: cuda when there is one)")

    p = _verb(esub, "bpb", "bits per UTF-8 byte of a run on a text file (one post per line) or a corpus split",
              "tweetlm eval bpb work/demo/run --corpus work/demo/corpus --split val", _eval_bpb)
    p.add_argument("run_dir", metavar="RUN", help="a run folder written by `tweetlm train` (or one of its checkpoints)")
    p.add_argument("--text", metavar="FILE", help="a UTF-8 text file, one post per line (taken as it is)")
    p.add_argument("--corpus", metavar="CORPUS", help="a folder written by `tweetlm data prepare` (its clean_text)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="the corpus split (default val)")
    p.add_argument("--window", type=int, metavar="TOKENS", help="tokens of context per window (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")


def _add_safety(sub):
    ssub = _group(sub, "safety", "the toxicity classifier behind --drop-toxic and --moderate")
    p = _verb(ssub, "train", "train a toxicity classifier (offensive or hateful vs neither) on TweetEval's offensive "
              "and hate train splits; prints val F1 beside a majority baseline",
              "tweetlm safety train --data ../shared/data/tweeteval --out work/safety", _safety_train)
    p.add_argument("--data", required=True, metavar="DIR", help="laid out as TweetEval's datasets/ folder "
                   "(offensive/ and hate/ are read), e.g. ../shared/data/tweeteval")
    p.add_argument("--out", required=True, metavar="SAFETY", help="output folder (safety.json, weights.safetensors)")
    p.add_argument("--max-train-examples", type=int, metavar="N", help="a seeded sample of N posts of each set, "
                   "for quick runs")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and training (default 0)")


# ---------------------------------------------------------------- model and generation


def _model_presets(a):
    from tweetlm.model.sizing import PRESETS, flops_per_token, num_params, preset

    print(f"{'preset':<8}{'depth':>6}{'dim':>6}{'heads':>6}{'kv':>4}{'ffn':>7}{'params':>16}{'FLOPs/token':>14}"
          f"   (vocab {a.vocab_size}, seq {a.seq_len}; FLOPs = training, forward + backward)")
    for name in PRESETS:
        c = preset(name, vocab_size=a.vocab_size, max_seq_len=a.seq_len)
        print(f"{name:<8}{c.depth:>6}{c.dim:>6}{c.n_heads:>6}{c.n_kv_heads:>4}{c.ffn_dim:>7}{num_params(c):>16,}"
              f"{flops_per_token(c, a.seq_len):>14.3e}")


def _generate(a):
    from tweetlm.infer.generate import GenerateConfig, generate
    from tweetlm.model.weights import load_model

    cfg = GenerateConfig(run=Path(a.run_dir), prompt=a.prompt, num_samples=a.num_samples, max_new_tokens=a.max_new_tokens,
                         temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, stop=tuple(a.stop), seed=a.seed,
                         device=a.device)
    model, tokenizer = load_model(cfg.run, device=cfg.device)
    current = None
    for i, piece in generate(model, tokenizer, cfg):
        if i != current:  # samples stream one after another when several are asked for
            print(("\n" if current is not None else "") + (f"[{i + 1}] " if cfg.num_samples > 1 else "") + cfg.prompt, end="")
            current = i
        print(piece, end="", flush=True)
    print()


def _add_model(sub):
    msub = _group(sub, "model", "model shapes: presets, parameter and FLOP counts")
    p = _verb(msub, "presets", "print each preset's shape, exact parameter count and training FLOPs per token",
              "tweetlm model presets --vocab-size 32768 --seq-len 2048", _model_presets)
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size (default 32768)")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length, for the attention FLOPs (default 1024)")


def _add_sampling(p, *, seed_help: str) -> None:
    """The sampling flags `generate` and `chat` share."""
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 is off (default 50)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 is off (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help=seed_help)


def _add_generate(sub):
    p = _verb(sub, "generate", "write posts with a trained model, streaming tokens as they come",
              "tweetlm generate work/demo/run --prompt 'Monday mornings are' --num-samples 3 --seed 1", _generate)
    p.add_argument("run_dir", metavar="RUN", help="a run folder written by `tweetlm train`")
    p.add_argument("--prompt", default="", help="text the posts start with (default: none, a fresh post)")
    p.add_argument("--num-samples", type=int, default=1, help="how many posts (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many tokens per post (default 64)")
    _add_sampling(p, seed_help="make sampling reproducible")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop a post at this text (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")


def _task(a):
    from tweetlm.infer.tasks import TaskConfig, posts

    inputs = {"compose": lambda: {"topic": a.topic, "hashtags": tuple(a.hashtag)}, "reply": lambda: {"post": a.post},
              "summarize": lambda: {"thread": _thread_lines(a.thread)}}[a.verb]()
    cfg = TaskConfig(run=Path(a.run_dir), num_samples=a.num_samples, max_tokens=a.max_tokens, temperature=a.temperature,
                     top_k=a.top_k, top_p=a.top_p, seed=a.seed, device=a.device)
    for i, post in enumerate(posts(cfg, a.verb, **inputs)):
        print(f"[{i + 1}] {post}" if cfg.num_samples > 1 else post)


def _thread_lines(source: str) -> list[str]:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --thread {source}: {getattr(e, 'strerror', None) or e}") from None
    return [line for line in text.splitlines() if line.strip()]


def _add_tasks(sub):
    """compose, reply, summarize: one post each, cut between words, no @user/http placeholders (infer/tasks.py)."""
    verbs = (("compose", "write a post of at most 280 characters about a topic and/or with hashtags (each kept)",
              "tweetlm compose runs/small-chat --topic 'monday mornings' --hashtag coffee --num-samples 3 --seed 1"),
             ("reply", "write a reply of at most 280 characters to a post",
              "tweetlm reply runs/small-chat --post 'Who else is still up? #insomnia'"),
             ("summarize", "sum up a thread (one post per line) in one post of at most 280 characters",
              "tweetlm summarize runs/small-chat --thread thread.txt   # or --thread - to read stdin"))
    for name, help, example in verbs:
        p = _verb(sub, name, help, example, _task)
        p.add_argument("run_dir", metavar="RUN", help="a run folder (a chat fine-tuned one, `tweetlm sft`, answers best)")
        if name == "compose":
            p.add_argument("--topic", default="", help="what the post is about (default: anything)")
            p.add_argument("--hashtag", action="append", default=[], metavar="TAG",
                           help="a hashtag the post must hold, with or without # (repeatable)")
        elif name == "reply":
            p.add_argument("--post", required=True, help="the post to reply to")
        else:
            p.add_argument("--thread", required=True, metavar="FILE", help="the thread's posts, one per line; - reads stdin")
        p.add_argument("--num-samples", type=int, default=1, help="how many posts, decoded together (default 1)")
        p.add_argument("--max-tokens", type=int, default=256, help="at most this many tokens per post (default 256)")
        _add_sampling(p, seed_help="make sampling reproducible (sample i uses seed + i)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")


# ---------------------------------------------------------------- Hugging Face export and import


def _export_hf(a):
    from tweetlm.model.hf import export_hf

    export_hf(Path(a.run_dir), Path(a.out), dtype=a.dtype)


def _import_hf(a):
    from tweetlm.model.hf import import_hf

    import_hf(Path(a.src), Path(a.out))


def _add_export(sub):
    esub = _group(sub, "export", "write a trained model in another format")
    p = _verb(esub, "hf", "write a run's best checkpoint as a Hugging Face Llama model folder (transformers, vLLM, llama.cpp)",
              "tweetlm export hf runs/small --out export/small --dtype bfloat16", _export_hf)
    p.add_argument("run_dir", metavar="RUN", help="a run folder written by `tweetlm train` (or one of its checkpoints)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: config.json, model.safetensors, tokenizer files")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights' type (default float32)")


def _add_import(sub):
    isub = _group(sub, "import", "start a run from a model made elsewhere")
    p = _verb(isub, "hf", "make a run folder (tokenizer + step-0 checkpoint) from a Hugging Face Llama model folder",
              "tweetlm import hf models/SmolLM2-135M --out runs/smol", _import_hf)
    p.add_argument("src", metavar="DIR", help="a local folder with config.json, model.safetensors (or shards) and tokenizer.json")
    p.add_argument("--out", required=True, metavar="RUN", help="the new run folder")


# ---------------------------------------------------------------- plan


def _plan(a):
    import json

    from tweetlm.plan.planner import PlanConfig, format_plan, parse_count, plan

    result = plan(PlanConfig(
        gpus=a.gpus, gpu=a.gpu, days=a.days, mfu=a.mfu, params=parse_count(a.params) if a.params else None,
        tokens_per_param=a.tokens_per_param, seq_len=a.seq_len, vocab_size=a.vocab_size, optimizer=a.optimizer,
        tokens_dir=Path(a.tokens) if a.tokens else None,
    ))
    print(json.dumps(result.to_dict(), indent=1) if a.json else format_plan(result))


def _add_plan(sub):
    p = _verb(sub, "plan", "plan a training run for N GPUs over D days: model size, tokens, memory per GPU, layout, time, posts",
              "tweetlm plan --gpus 10000 --gpu h100 --days 30 --tokens work/demo/tokens", _plan)
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu", default="h100", help="a100, h100, h200 or b200 (default h100)")
    p.add_argument("--days", type=float, required=True, help="wall-clock days of training")
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilization (default 0.40; Llama 3 405B: 0.38-0.43)")
    p.add_argument("--params", metavar="N", help="plan for this size, e.g. 70B, instead of the compute-optimal one")
    p.add_argument("--tokens-per-param", type=float, default=20.0, metavar="R",
                   help="compute-optimal tokens per parameter (default 20, Chinchilla; nanochat measured ~10.5)")
    p.add_argument("--seq-len", type=int, default=2048, help="training sequence length (default 2048)")
    p.add_argument("--vocab-size", type=int, help="vocabulary size (default: the --tokens folder's, else 32768)")
    p.add_argument("--optimizer", choices=("muon", "adamw"), default="muon", help="sets the optimizer state's size (default muon)")
    p.add_argument("--tokens", metavar="TOKENS", help="a `tweetlm data tokenize` folder: measure tokens per post on it")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


# ---------------------------------------------------------------- serve and chat


def _serve(a):
    from tweetlm.serve.app import ServeLimits
    from tweetlm.serve.grounding import GroundingConfig
    from tweetlm.serve.server import ServeConfig, serve

    key = a.api_key
    if a.api_key_file:
        try:
            key = Path(a.api_key_file).read_text().strip()
        except OSError as e:
            raise UserError(f"cannot read --api-key-file {a.api_key_file}: {e.strerror}") from None
    limits = ServeLimits(max_body_bytes=a.max_body_kb * 1024, max_concurrent=a.max_concurrent,
                         request_timeout=a.request_timeout)
    moderate, threshold = _safety_spec(a.moderate) if a.moderate else (None, None)
    serve(ServeConfig(run=Path(a.run_dir), host=a.host, port=a.port, model_name=a.model_name, api_key=key,
                      device=a.device, max_batch_size=a.max_batch_size, limits=limits, moderate=moderate,
                      moderate_threshold=threshold, index=Path(a.index) if a.index else None,
                      grounding=GroundingConfig(default=a.ground, k=a.ground_k, tokens=a.ground_tokens)))


def _add_serve(sub):
    p = _verb(sub, "serve", "serve a model: OpenAI-compatible API at /v1 and a web chat page at /",
              "tweetlm serve work/demo/run --port 8000   # then open http://127.0.0.1:8000/", _serve)
    p.add_argument("run_dir", metavar="RUN", help="a run folder written by `tweetlm train` (or one of its checkpoints)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 opens it to the network (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default 8000)")
    p.add_argument("--model-name", help="the model's name in the API (default: the run folder's name)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 and /metrics (visible in `ps`: "
                                     "prefer --api-key-file)")
    p.add_argument("--api-key-file", metavar="FILE", help="read the API key from this file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-concurrent", type=int, default=64, help="generation requests at once; more get 429 (default 64)")
    p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body; more gets 413 (default 1024)")
    p.add_argument("--moderate", metavar="SAFETY[:THRESHOLD]", help="a `tweetlm safety train` classifier: serve "
                   "/v1/moderations, refuse requests and replies it scores toxic (at its threshold, or THRESHOLD)")
    p.add_argument("--request-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="longest a request may run, queue included; then 408, or an error event in a stream (default 300)")
    p.add_argument("--index", metavar="INDEX", help="a posts index (`tweetlm index add`; made if missing): serve "
                   "POST /v1/posts and GET /v1/search, and ground chat answers that ask (\"grounding\": true)")
    p.add_argument("--ground", action="store_true", help="ground every chat answer on --index unless the request "
                   "says \"grounding\": false; answers cite posts as [post:ID], unknown ids are stripped")
    p.add_argument("--ground-k", type=int, default=5, metavar="K",
                   help="posts a grounded question retrieves (default 5; a request's grounding_k overrides it)")
    p.add_argument("--ground-tokens", type=int, default=1024, metavar="N",
                   help="most prompt tokens the retrieved posts may take; the lowest-ranked are dropped (default 1024)")


def _chat(a):
    from tweetlm.serve.chat import ChatConfig, chat

    chat(ChatConfig(run=Path(a.run_dir), system=a.system, max_tokens=a.max_tokens, temperature=a.temperature,
                    top_k=a.top_k, top_p=a.top_p, seed=a.seed, device=a.device))


def _add_chat(sub):
    p = _verb(sub, "chat", "chat with a model in the terminal (the server's chat template); /new starts over, /quit ends",
              "tweetlm chat work/demo/run --system 'You answer in one short post.' --seed 1", _chat)
    p.add_argument("run_dir", metavar="RUN", help="a run folder written by `tweetlm train` (a chat fine-tuned one answers best)")
    p.add_argument("--system", default="", help="a system message that opens the conversation")
    p.add_argument("--max-tokens", type=int, default=256, help="at most this many tokens per reply (default 256)")
    _add_sampling(p, seed_help="make a session reproducible")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")


# ---------------------------------------------------------------- posts index and search


def _index_add(a):
    from tweetlm.search.index import add_files

    add_files(tuple(a.inputs), Path(a.index))


def _search(a):
    import json

    from tweetlm.search.index import Index, format_hits, parse_duration

    with Index(Path(a.index), create=False) as index:
        hits = index.search(a.query, since=a.since, limit=a.limit, half_life=parse_duration(a.half_life))
    print(json.dumps(hits, ensure_ascii=False, indent=1) if a.json else format_hits(hits))


def _add_index(sub):
    isub = _group(sub, "index", "the posts index that search and grounding read")
    p = _verb(isub, "add", "add posts (any format `data prepare` reads) to a search index; re-added posts are updated",
              "tweetlm index add ../shared/data/twitter-api-v2 'dumps/*.jsonl.zst' --index work/posts.db", _index_add)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs (plain, .gz, .zst, .bz2)")
    p.add_argument("--index", required=True, metavar="INDEX", help="the index file (SQLite), made if missing")


def _add_search(sub):
    p = _verb(sub, "search", "search an index of posts: BM25 with a recency boost, best first",
              "tweetlm search 'garage tools' --index work/posts.db --since 7d --limit 5", _search)
    p.add_argument("query", metavar="QUERY", help="words to look for (any of them; rarer words count more)")
    p.add_argument("--index", required=True, metavar="INDEX", help="an index file written by `tweetlm index add`")
    p.add_argument("--since", metavar="WHEN", help="only posts from then on: an ISO date or time (2024-05-01, "
                   "2024-05-01T12:00:00Z) or a duration back from now (90m, 24h, 7d, 2w)")
    p.add_argument("--limit", type=int, default=10, help="how many posts (default 10, at most 1000)")
    p.add_argument("--half-life", default="24h", metavar="DURATION",
                   help="age at which the recency boost halves; a new post scores up to 2x an old one (default 24h)")
    p.add_argument("--json", action="store_true", help="print the posts as JSON, with every field and the score")


# ---------------------------------------------------------------- demo


def _demo(a):
    from tweetlm.demo import DemoConfig, demo

    demo(DemoConfig(data=tuple(a.data), shared=SHARED_DATA, out=Path(a.out), minutes=a.minutes))


def _add_demo(sub):
    p = _verb(sub, "demo", "the whole pipeline on the bundled tweets: prepare, tokenizer, tokenize, ~5 minutes of training, posts",
              "tweetlm demo --minutes 5 --out work/demo", _demo)
    p.add_argument("--data", nargs="+", default=[], metavar="INPUT", help="your own posts instead of the bundled tweets")
    p.add_argument("--out", default="work/demo", help="working folder (default work/demo)")
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget (default 5)")


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tweetlm",
        description="Build a platform's own generative AI from its own posts.\n\n"
        "first run:\n  tweetlm demo            # prepare, tokenize and train a small model on the bundled tweets",
        formatter_class=_formatter,
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_data(sub)
    _add_tokenizer(sub)
    _add_train(sub)
    _add_sft(sub)
    _add_eval(sub)
    _add_safety(sub)
    _add_model(sub)
    _add_generate(sub)
    _add_tasks(sub)
    _add_export(sub)
    _add_import(sub)
    _add_plan(sub)
    _add_serve(sub)
    _add_chat(sub)
    _add_index(sub)
    _add_search(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except UserError as e:
        print(f"tweetlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tweetlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as coreutils do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    return 0
