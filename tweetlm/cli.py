"""tweetlm VERB ...: a thin layer that parses flags and calls one stage function per verb.

Stage modules are imported inside each verb, so `tweetlm --help` stays instant.
A UserError from any stage becomes one line on stderr and exit code 2; a ConfigError names the flag of its field.
Each default lives in one place, the verb's config dataclass: a flag whose dest is a field of it (dotted for a
nested config: "sampling.temperature") defaults to None, `_config` leaves a flag not given to the dataclass, and
the help text reads the default from the dataclass when `VERB --help` is printed.
"""

import argparse
import dataclasses
import importlib
import inspect
import os
import sys
from pathlib import Path

from tweetlm.errors import ConfigError, UserError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit 2 (argparse prints the whole usage)."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _formatter(prog, config: str | None = None):
    class Formatter(argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action):
            default = _default(config, action.dest) if config else None
            shown = default is not None and default is not False and "default" not in (action.help or "")
            return f"{action.help} (default {_show(default)})" if shown else action.help

    return Formatter(prog, max_help_position=32)


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _class(config: str):
    """"tweetlm.data.prepare.PrepareConfig" -> the class (or "tweetlm.search.index.Index.search" -> the function)."""
    parts = config.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            value = getattr(value, name)
        return value
    raise AssertionError(f"no module in {config}")


def _field_default(cls_or_obj, name: str):
    """The default of field `name` of a dataclass (or its value on an instance); dataclasses.MISSING if none."""
    if not isinstance(cls_or_obj, type):
        return getattr(cls_or_obj, name)
    found = {f.name: f for f in dataclasses.fields(cls_or_obj)}.get(name)
    if found is None:
        return dataclasses.MISSING
    if found.default_factory is not dataclasses.MISSING:
        return found.default_factory()
    return found.default


def _default(config: str, dest: str):
    """The default of the (dotted) field `dest` of dataclass `config` ("module.Class"), or of the keyword `dest` of
    function `config` ("module.Class.method"); None if there is none."""
    value = _class(config)
    if hasattr(value, "flag_default"):  # a verb whose flags mean more than its fields (sft: TrainConfig keys)
        return value.flag_default(dest)
    if not dataclasses.is_dataclass(value):
        found = inspect.signature(value).parameters.get(dest)
        return None if found is None or found.default is inspect.Parameter.empty else found.default
    for part in dest.split("."):
        if not dataclasses.is_dataclass(value):
            return None
        value = _field_default(value, part)
    return None if value is dataclasses.MISSING else value


def _config(cls, a, **fixed):
    """cls(**fixed, and every flag given whose dest is a (dotted) field of cls): a flag left out keeps cls's
    default. A nested config ("sampling.temperature") is its default with the given fields replaced."""
    values = {k: v for k, v in fixed.items() if v is not None}
    nested, names = {}, {f.name for f in dataclasses.fields(cls)}
    for dest, value in vars(a).items():
        head, _, rest = dest.partition(".")
        if value is None or dest in fixed or head not in names:
            continue
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            values[dest] = value
    for head, changes in nested.items():
        values[head] = dataclasses.replace(values.get(head) or _field_default(cls, head), **changes)
    return cls(**values)


def _keywords(fn, a) -> dict:
    """The flags given whose dest is a keyword-only parameter of `fn`: a flag left out keeps fn's default."""
    names = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {dest: value for dest, value in vars(a).items() if value is not None and dest in names}


def _group(sub, name: str, help: str):
    """A verb with actions under it (`tweetlm data prepare`): returns the subparsers to add the actions to."""
    group = sub.add_parser(name, help=help, formatter_class=_formatter)
    return group.add_subparsers(dest="action", required=True, metavar="ACTION")


def _verb(sub, name: str, help: str, example: str, run, config: str | None = None) -> argparse.ArgumentParser:
    """A verb (or action) that calls `run(args)`; `config` ("module.Class") is the dataclass its flags fill."""
    p = sub.add_parser(name, help=help, description=f"{help}\n\nexample:\n  {example}",
                       formatter_class=lambda prog: _formatter(prog, config))
    p.set_defaults(_run=run, _parser=p)
    return p


def _flag_of(parser: argparse.ArgumentParser, field: str) -> str | None:
    """The flag whose dest is `field`, or ends in ".field" (a nested config's field)."""
    for action in parser._actions:
        if action.option_strings and (action.dest == field or action.dest.endswith("." + field)):
            return action.option_strings[0]
    return None


# ---------------------------------------------------------------- data


def _data_prepare(a):
    from tweetlm.data.prepare import PrepareConfig, prepare

    toxic, threshold = _safety_spec(a.drop_toxic) if a.drop_toxic else (None, None)
    lang = None if a.lang is None else tuple(c.strip() for c in a.lang.split(",") if c.strip())
    prepare(_config(PrepareConfig, a, inputs=tuple(a.inputs), lang=lang, keep_reposts=a.keep_reposts,
                    drop_spam=not a.keep_spam, mentions=not a.keep_mentions, links=not a.keep_links,
                    drop_toxic=toxic, toxic_threshold=threshold))


def _data_tokenize(a):
    from tweetlm.tokenizer.shards import TokenizeConfig, tokenize

    tokenize(_config(TokenizeConfig, a))


def _data_fetch(a):
    from tweetlm.data.fetch import fetch_tweeteval

    fetch_tweeteval(out=Path(a.out), local=Path(a.from_dir) if a.from_dir else None)


def _data_threads(a):
    from tweetlm.data.threads import ThreadsConfig, threads

    threads(_config(ThreadsConfig, a))


def _data_tasks(a):
    from tweetlm.data.tasks import TasksConfig, tasks

    names = None if a.tasks is None else tuple(t.strip() for t in a.tasks.split(",") if t.strip())
    tasks(_config(TasksConfig, a, tasks=names))


def _ray_flag(p, what: str) -> None:
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help=f"run on a Ray cluster, {what} (same output as without): auto (the cluster this machine joined "
                        "with `ray start`), ray://HOST:PORT, or nothing for a Ray started for this run; paths must "
                        "name the same files on every node")


def _add_data(sub):
    dsub = _group(sub, "data", "read, clean and tokenize posts")

    p = _verb(dsub, "prepare", "read raw posts (any supported format), clean, filter, dedup and split them into a Parquet corpus",
              "tweetlm data prepare ../shared/data/twitter-api-v2 'dumps/*.jsonl.zst' --out work/corpus --workers 2",
              _data_prepare, "tweetlm.data.prepare.PrepareConfig")
    # URLs stay strings (a Path would fold s3://b/x into s3:/b/x): PrepareConfig refuses them without --ray.
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs (plain, .gz, .zst, .bz2); "
                   "with --ray also URLs (s3://, gs://, file://)")
    p.add_argument("--out", required=True, metavar="CORPUS", help="output folder for Parquet shards and report.json; "
                   "with --ray also a URL")
    p.add_argument("--workers", type=int, help="processes, work split by file")
    p.add_argument("--lang", metavar="CODES", help="keep only these languages (py3langid), e.g. en,fr; default keeps all")
    p.add_argument("--min-chars", type=int, help="drop posts shorter than this after normalization")
    p.add_argument("--max-chars", type=int, help="drop posts longer than this after normalization")
    p.add_argument("--keep-reposts", action="store_true", help="keep reposts (retweets); dropped by default")
    p.add_argument("--keep-spam", action="store_true", help="keep posts that are mostly hashtags, mentions or links")
    p.add_argument("--drop-top-authors", type=float, metavar="FRACTION",
                   help="drop the most prolific FRACTION of authors as likely bots, e.g. 0.01 as TimeLMs; 0 is off")
    p.add_argument("--near-dup", dest="near_dup_threshold", type=float, metavar="JACCARD",
                   help="drop near duplicates at this MinHash Jaccard similarity; 0 turns it off")
    p.add_argument("--near-dup-mb", type=int, metavar="MB",
                   help="fixed memory of the near-duplicate index; copies further apart than about "
                        "15,000 posts per MB start to be missed (128: 1.9M posts)")
    p.add_argument("--val-ratio", type=float, help="share of conversations in val")
    p.add_argument("--test-ratio", type=float, help="share of conversations in test")
    p.add_argument("--keep-mentions", action="store_true", help="keep @handles (default: replace with @user)")
    p.add_argument("--keep-links", action="store_true", help="keep URLs (default: replace with http)")
    p.add_argument("--seed", type=int, help="seed of the split hash and MinHash")
    p.add_argument("--drop-toxic", metavar="SAFETY[:THRESHOLD]", help="drop posts that a `tweetlm safety train` "
                   "classifier scores toxic, at its own threshold or THRESHOLD (in (0, 1])")
    _ray_flag(p, "with each stage spread over the nodes")

    p = _verb(dsub, "tokenize", "turn a corpus into memory-mappable token shards per split",
              "tweetlm data tokenize work/corpus --tokenizer work/tokenizer --out work/tokens --workers 2", _data_tokenize,
              "tweetlm.tokenizer.shards.TokenizeConfig")
    p.add_argument("corpus", type=Path, metavar="CORPUS", help="a folder written by `tweetlm data prepare`")
    p.add_argument("--tokenizer", type=Path, required=True, metavar="TOKENIZER", help="a folder written by `tweetlm tokenizer train`")
    p.add_argument("--out", type=Path, required=True, metavar="TOKENS", help="output folder for the token shards and index.json")
    p.add_argument("--workers", type=int, help="processes")
    _ray_flag(p, "encoding on every node")

    p = _verb(dsub, "fetch", "get the public TweetEval text files (from GitHub, or a local copy with --from)",
              "tweetlm data fetch --from ../shared/data/tweeteval --out work/tweeteval", _data_fetch)
    p.add_argument("--out", required=True, metavar="DIR", help="where to put the files")
    p.add_argument("--from", dest="from_dir", metavar="DIR", help="copy from this local TweetEval folder instead of downloading")

    p = _verb(dsub, "threads", "rebuild reply threads and write each root-to-leaf path as a chat conversation (OpenAI messages, JSONL)",
              "tweetlm data threads work/corpus --out work/conversations.jsonl --split train", _data_threads,
              "tweetlm.data.threads.ThreadsConfig")
    p.add_argument("corpus", type=Path, metavar="CORPUS", help="a folder written by `tweetlm data prepare`")
    p.add_argument("--out", type=Path, required=True, metavar="CONVERSATIONS.jsonl", help="output file, one conversation a line")
    p.add_argument("--split", choices=("train", "val", "test", "all"), help="which split's threads")

    p = _verb(dsub, "tasks", "make the assistant's task conversations from the corpus (compose, reply, summarize) and "
              "TweetEval (tone), in the JSONL of `data threads` plus a task field",
              "tweetlm data tasks work/corpus --out work/tasks.jsonl --tweeteval ../shared/data/tweeteval", _data_tasks,
              "tweetlm.data.tasks.TasksConfig")
    p.add_argument("corpus", type=Path, metavar="CORPUS", help="a folder written by `tweetlm data prepare`")
    p.add_argument("--out", type=Path, required=True, metavar="TASKS.jsonl", help="output file, one conversation a line")
    p.add_argument("--tweeteval", type=Path, metavar="DIR", help="TweetEval's datasets/ folder, for the tone task")
    p.add_argument("--split", choices=("train", "val", "test"), help="corpus and TweetEval split")
    p.add_argument("--tasks", metavar="TASKS", help="comma-separated among compose,reply,summarize,tone "
                   "(default: all four with --tweeteval, else the first three)")
    p.add_argument("--seed", type=int, help="seed of each compose prompt's kind and topic length")


# ---------------------------------------------------------------- tokenizer


def _tokenizer_train(a):
    from tweetlm.tokenizer.trainer import TokenizerConfig, train_tokenizer

    train_tokenizer(_config(TokenizerConfig, a))


def _add_tokenizer(sub):
    tsub = _group(sub, "tokenizer", "train a byte-level BPE tokenizer")
    p = _verb(tsub, "train", "train byte-level BPE on the corpus's train split; prints bytes per token on val",
              "tweetlm tokenizer train work/corpus --vocab-size 8192 --out work/tokenizer", _tokenizer_train,
              "tweetlm.tokenizer.trainer.TokenizerConfig")
    p.add_argument("corpus", type=Path, metavar="CORPUS", help="a folder written by `tweetlm data prepare`")
    p.add_argument("--vocab-size", type=int, help="vocabulary size, special tokens included")
    p.add_argument("--sample", type=int, metavar="N", help="train on N posts of the train split drawn at random "
                   "(seeded), read without loading the corpus; default: all of it")
    p.add_argument("--out", type=Path, required=True, metavar="TOKENIZER", help="output folder for tokenizer.json")


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
              _train, "tweetlm.train.config.TrainConfig")
    p.add_argument("--tokens", metavar="TOKENS", help="token shards from `tweetlm data tokenize`")
    p.add_argument("--tokenizer", metavar="TOKENIZER", help="the tokenizer the shards were made with "
                   "(default: the one `data tokenize` saved beside them)")
    p.add_argument("--init-from", metavar="RUN", help="start from another run's best checkpoint (or an `import hf` run): "
                   "its shape and weights, fresh optimizers")
    p.add_argument("--out", required=True, metavar="RUN", help="the run folder")
    p.add_argument("--config", metavar="FILE.toml", help="run config (see configs/); flags below override it")
    p.add_argument("--preset", help="model shape by name: tiny, small, 125m, 1b, 8b, small-moe, grok-1, deepseek-v3 "
                   "(default tiny; `tweetlm model presets` lists them)")
    p.add_argument("--depth", type=int, help="model shape by depth (width and heads follow); replaces --preset")
    p.add_argument("--steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--time-budget", type=float, metavar="MINUTES", help="stop after this much training time; "
                   "the LR schedule then follows time (with --steps too: whichever ends first)")
    p.add_argument("--seed", type=int, help="seed of weights, data order and samples")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="auto: cuda when there is one")
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
    sft(_config(SftConfig, a, data=tuple(Source.parse(d) for d in a.data), overrides=overrides), resume=a.resume)


def _add_sft(sub):
    p = _verb(sub, "sft", "fine-tune a run into a chat model on conversations (loss on the assistant's messages only); "
              "prints and saves to RUN/sft.json the held-out assistant bits-per-byte before and after",
              "tweetlm data threads work/demo/corpus --out work/threads.jsonl --split all\n"
              "  tweetlm sft work/demo/run --data work/threads.jsonl --out work/demo/chat --steps 200\n"
              "  tweetlm sft runs/small --data threads.jsonl --data tasks.jsonl:0.5 --out runs/small-chat --time-budget 10",
              _sft, "tweetlm.train.sft.SftConfig")
    p.add_argument("base", type=Path, metavar="BASE", help="the run to fine-tune (its best checkpoint), or one checkpoint folder")
    p.add_argument("--data", action="append", required=True, metavar="FILE[:WEIGHT]",
                   help="conversations, JSONL of {\"messages\": [...]} as `data threads` writes (repeatable); files "
                   "are mixed in proportion to their weights (default 1)")
    p.add_argument("--out", type=Path, required=True, metavar="RUN", help="the new run folder")
    p.add_argument("--steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--time-budget", type=float, metavar="MINUTES", help="stop after this much training time "
                   "(with --steps too: whichever ends first)")
    p.add_argument("--val-ratio", type=float, metavar="R", help="share of each --data file held out to measure "
                   "bits-per-byte, by a hash of its conversation_id or thread_id")
    p.add_argument("--val", type=Path, metavar="FILE", help="held-out conversations instead of --val-ratio")
    p.add_argument("--seed", type=int, help="seed of the data order and mix")
    p.add_argument("--resume", action="store_true", help="continue RUN from its latest checkpoint, with its config.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any `train` config key, e.g. --set optim.lr=0.01 --set device=cpu (repeatable)")


# ---------------------------------------------------------------- eval and safety


def _eval_tweeteval(a):
    from tweetlm.eval.tweeteval import TweetEvalConfig, tweeteval

    tasks = None if a.tasks is None else tuple(t.strip() for t in a.tasks.split(",") if t.strip())
    tweeteval(_config(TweetEvalConfig, a, tasks=tasks))


def _eval_bpb(a):
    from tweetlm.eval.bpb import BpbConfig, bpb

    bpb(_config(BpbConfig, a))


def _classify(a):
    import json

    from tweetlm.eval.classify import classify

    texts = []
    for text in a.texts:
        texts += [line for line in sys.stdin.read().splitlines() if line.strip()] if text == "-" else [text]
    for row in classify(a.dir, a.task, texts, **_keywords(classify, a)):
        print(json.dumps(row, ensure_ascii=False))


def _add_classify(sub):
    p = _verb(sub, "classify", "label posts with a classifier kept by `eval tweeteval RUN --save DIR`: one JSON line "
              "per post (text, label, probabilities)",
              "tweetlm classify work/classifiers --task irony 'Love waiting an hour for the bus in the rain'\n"
              "  tweetlm classify work/classifiers --task stance/climate - < posts.txt", _classify,
              "tweetlm.eval.classify.classify")
    p.add_argument("dir", type=Path, metavar="DIR", help="a folder written by `tweetlm eval tweeteval RUN --save DIR`")
    # "+" and "-" for stdin, not "*" and stdin when no TEXT: argparse gives a "*" positional nothing when an option
    # follows DIR, then refuses the TEXTs after it (`classify DIR --task irony TEXT`)
    p.add_argument("texts", nargs="+", metavar="TEXT", help="a post to label; - reads posts from stdin, one per line "
                   "(blank lines skipped)")
    p.add_argument("--task", required=True, help="a task saved there: emoji, emotion, hate, irony, offensive, or "
                   "stance/TARGET (stance/abortion, ...)")
    _add_device(p)


def _safety_spec(spec: str) -> tuple[Path, float | None]:
    from tweetlm.artifacts.safety import parse_spec

    return parse_spec(spec)


def _safety_train(a):
    from tweetlm.eval.safety import SafetyConfig, train_safety

    train_safety(_config(SafetyConfig, a))


def _add_eval(sub):
    esub = _group(sub, "eval", "evaluate: TweetEval classification, bits per byte")
    p = _verb(esub, "tweeteval", "TweetEval's six tasks: fine-tune a run per task (beside the TF-IDF floor), "
              "predict a split in the benchmark's format, official metrics beside the published rows",
              "tweetlm eval tweeteval work/demo/run --data ../shared/data/tweeteval --split val", _eval_tweeteval,
              "tweetlm.eval.tweeteval.TweetEvalConfig")
    p.add_argument("run", type=Path, nargs="?", metavar="RUN", help="a run folder (or checkpoint) to fine-tune with a "
                   "classification head per task; its row is named after the folder")
    p.add_argument("--model", choices=("tfidf",), help="a built-in model instead of RUN: tfidf, TF-IDF n-grams + "
                   "logistic regression (the floor baseline)")
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="laid out as TweetEval's datasets/ folder "
                   "(emoji/, emotion/, ... stance/TARGET/), e.g. ../shared/data/tweeteval")
    p.add_argument("--split", choices=("val", "test"), help="the split to predict and score")
    p.add_argument("--tasks", metavar="TASKS", help="comma-separated")
    p.add_argument("--out", type=Path, metavar="DIR", help="predictions (DIR/MODEL/TASK.txt) and scores.json "
                   "(default RUN/tweeteval-SPLIT, or ./tweeteval-SPLIT with --model)")
    p.add_argument("--max-train-examples", type=int, metavar="N", help="train on a seeded sample of N posts per task, "
                   "for quick runs")
    p.add_argument("--seed", type=int, help="seed of sampling and training")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs per task; val picks the best")
    p.add_argument("--lr", type=float, help="fine-tuning peak learning rate, AdamW")
    p.add_argument("--batch-size", type=int, help="fine-tuning posts per step")
    p.add_argument("--pooling", metavar="last|mean", help="what the head reads: the post's last token's final state, "
                   "or their mean over the post's tokens")
    p.add_argument("--layer-decay", type=float, metavar="F", help="layer-wise LR decay: the head and the last block "
                   "at --lr, each block below at F times the one above, the embedding lowest; 1 is one LR for all")
    p.add_argument("--tapt-steps", type=int, metavar="N", help="task-adaptive pretraining: N next-token steps of the "
                   "run on each task's train texts before fine-tuning it")
    p.add_argument("--save", type=Path, metavar="DIR", help="keep each task's fine-tuned classifier (the epoch chosen "
                   "on val) in DIR, for `tweetlm classify DIR`")
    _add_device(p)

    p = _verb(esub, "bpb", "bits per UTF-8 byte of a run on a text file (one post per line) or a corpus split",
              "tweetlm eval bpb work/demo/run --corpus work/demo/corpus --split val", _eval_bpb, "tweetlm.eval.bpb.BpbConfig")
    p.add_argument("run", type=Path, metavar="RUN", help="a run folder written by `tweetlm train` (or one of its checkpoints)")
    p.add_argument("--text", type=Path, metavar="FILE", help="a UTF-8 text file, one post per line (taken as it is)")
    p.add_argument("--corpus", type=Path, metavar="CORPUS", help="a folder written by `tweetlm data prepare` (its clean_text)")
    p.add_argument("--split", choices=("train", "val", "test"), help="the corpus split")
    p.add_argument("--window", type=int, metavar="TOKENS", help="tokens of context per window (default: the model's)")
    p.add_argument("--batch-size", type=int, help="windows per forward")
    _add_device(p)


def _add_safety(sub):
    ssub = _group(sub, "safety", "the toxicity classifier behind --drop-toxic and --moderate")
    p = _verb(ssub, "train", "train a toxicity classifier (offensive or hateful vs neither) on TweetEval's offensive "
              "and hate train splits; prints val F1 beside a majority baseline",
              "tweetlm safety train --data ../shared/data/tweeteval --out work/safety", _safety_train,
              "tweetlm.eval.safety.SafetyConfig")
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="laid out as TweetEval's datasets/ folder "
                   "(offensive/ and hate/ are read), e.g. ../shared/data/tweeteval")
    p.add_argument("--out", type=Path, required=True, metavar="SAFETY", help="output folder (safety.json, weights.safetensors)")
    p.add_argument("--max-train-examples", type=int, metavar="N", help="a seeded sample of N posts of each set, "
                   "for quick runs")
    p.add_argument("--seed", type=int, help="seed of sampling and training")


# ---------------------------------------------------------------- model and generation


def _model_presets(a):
    from tweetlm.model.sizing import PRESETS, flops_per_token, num_params, preset

    print(f"{'preset':<12}{'depth':>6}{'dim':>6}{'heads':>6}{'kv':>4}{'ffn':>7}{'experts':>9}{'params':>18}{'active':>18}"
          f"{'FLOPs/token':>14}   (vocab {a.vocab_size}, seq {a.seq_len}; ffn: an expert's width in an MoE; FLOPs = "
          "training, forward + backward, over the active parameters)")
    for name in PRESETS:
        c = preset(name, vocab_size=a.vocab_size, max_seq_len=a.seq_len)
        experts = f"{c.experts}x{c.experts_active}" + (f"+{c.shared_experts}" if c.shared_experts else "") if c.experts else "-"
        print(f"{name:<12}{c.depth:>6}{c.dim:>6}{c.n_heads:>6}{c.n_kv_heads:>4}{c.expert_width if c.experts else c.ffn_dim:>7}"
              f"{experts:>9}{num_params(c):>18,}{num_params(c, active=True):>18,}{flops_per_token(c, a.seq_len):>14.3e}")


def _generate(a):
    import itertools

    from tweetlm.device import resolve_device
    from tweetlm.infer.generate import GenerateConfig, generate
    from tweetlm.model.weights import load_model

    cfg = _config(GenerateConfig, a)
    model, tokenizer = load_model(cfg.run, device=resolve_device(cfg.device))
    # samples stream one after another (when several are asked for), each opened by (i, ""): a post that ended at
    # once (its first token <|endoftext|>) still shows its header, and says so
    for i, pieces in itertools.groupby(generate(model, tokenizer, cfg), key=lambda piece: piece[0]):
        header = (f"[{i + 1}] " if cfg.num_samples > 1 else "") + cfg.prompt
        print(header, end="", flush=True)
        text = ""
        for _, piece in pieces:
            print(piece, end="", flush=True)
            text += piece
        print("" if text else " (empty: the post ended at once)" if header else "(empty: the post ended at once)")


def _add_model(sub):
    msub = _group(sub, "model", "model shapes: presets, parameter and FLOP counts")
    p = _verb(msub, "presets", "print each preset's shape, exact parameter count and training FLOPs per token",
              "tweetlm model presets --vocab-size 32768 --seq-len 2048", _model_presets)
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length, for the attention FLOPs (default %(default)s)")


def _add_sampling(p, *, seed_help: str) -> None:
    """The sampling flags of generate, chat and the tasks: fields of their config's `sampling` (a SamplingParams)."""
    p.add_argument("--temperature", dest="sampling.temperature", type=float, metavar="T", help="0 is greedy")
    p.add_argument("--top-k", dest="sampling.top_k", type=int, metavar="K", help="sample among the k likeliest tokens; 0 is off")
    p.add_argument("--top-p", dest="sampling.top_p", type=float, metavar="P", help="nucleus sampling mass; 1 is off")
    p.add_argument("--seed", type=int, help=seed_help)


def _add_device(p) -> None:
    p.add_argument("--device", help="auto (cuda when there is one), cpu, cuda or cuda:N")


def _add_generate(sub):
    p = _verb(sub, "generate", "write posts with a trained model, streaming tokens as they come",
              "tweetlm generate work/demo/run --prompt 'Monday mornings are' --num-samples 3 --seed 1", _generate,
              "tweetlm.infer.generate.GenerateConfig")
    p.add_argument("run", type=Path, metavar="RUN", help="a run folder written by `tweetlm train`")
    p.add_argument("--prompt", help="text the posts start with (default: none, a fresh post)")
    p.add_argument("--num-samples", type=int, help="how many posts")
    p.add_argument("--max-new-tokens", dest="sampling.max_tokens", type=int, metavar="N", help="at most this many tokens per post")
    _add_sampling(p, seed_help="make sampling reproducible (sample i uses seed + i)")
    p.add_argument("--stop", dest="sampling.stop", action="append", metavar="TEXT", help="stop a post at this text (repeatable)")
    _add_device(p)


def _task(a):
    from tweetlm.infer.tasks import TaskConfig, posts

    inputs = {"compose": lambda: {"topic": a.topic, "hashtags": tuple(a.hashtag)}, "reply": lambda: {"post": a.post},
              "summarize": lambda: {"thread": _thread_lines(a.thread)}}[a.verb]()
    cfg = _config(TaskConfig, a)
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
        p = _verb(sub, name, help, example, _task, "tweetlm.infer.tasks.TaskConfig")
        p.add_argument("run", type=Path, metavar="RUN", help="a run folder (a chat fine-tuned one, `tweetlm sft`, answers best)")
        if name == "compose":
            p.add_argument("--topic", default="", help="what the post is about (default: anything)")
            p.add_argument("--hashtag", action="append", default=[], metavar="TAG",
                           help="a hashtag the post must hold, with or without # (repeatable)")
        elif name == "reply":
            p.add_argument("--post", required=True, help="the post to reply to")
        else:
            p.add_argument("--thread", required=True, metavar="FILE", help="the thread's posts, one per line; - reads stdin")
        p.add_argument("--num-samples", type=int, help="how many posts, decoded together")
        p.add_argument("--max-tokens", dest="sampling.max_tokens", type=int, metavar="N", help="at most this many tokens per post")
        _add_sampling(p, seed_help="make sampling reproducible (sample i uses seed + i)")
        _add_device(p)


# ---------------------------------------------------------------- Hugging Face export and import


def _export_hf(a):
    from tweetlm.model.hf import export_hf

    export_hf(Path(a.run_dir), Path(a.out), **_keywords(export_hf, a))


def _import_hf(a):
    from tweetlm.model.hf import import_hf

    import_hf(Path(a.src), Path(a.out))


def _add_export(sub):
    esub = _group(sub, "export", "write a trained model in another format")
    p = _verb(esub, "hf", "write a run's best checkpoint as a Hugging Face Llama model folder (transformers, vLLM, llama.cpp)",
              "tweetlm export hf runs/small --out export/small --dtype bfloat16", _export_hf, "tweetlm.model.hf.export_hf")
    p.add_argument("run_dir", metavar="RUN", help="a run folder written by `tweetlm train` (or one of its checkpoints)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: config.json, model.safetensors, tokenizer files")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights' type")


def _add_import(sub):
    isub = _group(sub, "import", "start a run from a model made elsewhere")
    p = _verb(isub, "hf", "make a run folder (tokenizer + step-0 checkpoint) from a Hugging Face Llama model folder",
              "tweetlm import hf models/SmolLM2-135M --out runs/smol", _import_hf)
    p.add_argument("src", metavar="DIR", help="a local folder with config.json, model.safetensors (or shards) and tokenizer.json")
    p.add_argument("--out", required=True, metavar="RUN", help="the new run folder")


# ---------------------------------------------------------------- plan


def _plan(a):
    import json

    from tweetlm.plan.planner import PlanConfig, format_plan, parse_count, parse_moe, plan

    result = plan(_config(PlanConfig, a, params=parse_count(a.params) if a.params else None,
                          **(parse_moe(a.moe) if a.moe else {})))
    print(json.dumps(result.to_dict(), indent=1) if a.json else format_plan(result))


def _add_plan(sub):
    p = _verb(sub, "plan", "plan a training run for N GPUs over D days: model size, tokens, memory per GPU, layout, time, posts",
              "tweetlm plan --gpus 10000 --gpu h100 --days 30 --tokens work/demo/tokens", _plan, "tweetlm.plan.planner.PlanConfig")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu", help="a100, h100, h200 or b200")
    p.add_argument("--days", type=float, required=True, help="wall-clock days of training")
    p.add_argument("--mfu", type=float, help="model FLOPs utilization (Llama 3 405B: 0.38-0.43)")
    p.add_argument("--params", metavar="N", help="plan for this size, e.g. 70B, instead of the compute-optimal one")
    p.add_argument("--tokens-per-param", type=float, metavar="R",
                   help="compute-optimal tokens per parameter (20: Chinchilla; nanochat measured ~10.5)")
    p.add_argument("--seq-len", type=int, help="training sequence length")
    p.add_argument("--vocab-size", type=int, help="vocabulary size (default: the --tokens folder's, else 32768)")
    p.add_argument("--optimizer", choices=("muon", "adamw"), help="sets the optimizer state's size")
    p.add_argument("--tokens", dest="tokens_dir", type=Path, metavar="TOKENS",
                   help="a `tweetlm data tokenize` folder: measure tokens per post on it")
    p.add_argument("--moe", metavar="ExK[+S]", help="plan a mixture of experts: E experts, K active per token, S shared "
                   "(8x2: Mixtral, Grok-1; 256x8+1: DeepSeek-V3); FLOPs follow the active parameters, memory all of them, "
                   "--params the total")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


# ---------------------------------------------------------------- serve and chat


def _serve(a):
    from tweetlm.serve.server import ServeConfig, serve

    key = a.api_key
    if a.api_key_file:
        try:
            key = Path(a.api_key_file).read_text().strip()
        except OSError as e:
            raise UserError(f"cannot read --api-key-file {a.api_key_file}: {e.strerror}") from None
    moderate, threshold = _safety_spec(a.moderate) if a.moderate else (None, None)
    limits = None if a.max_body_kb is None else dataclasses.replace(
        _default("tweetlm.serve.server.ServeConfig", "limits"), max_body_bytes=a.max_body_kb * 1024)
    serve(_config(ServeConfig, a, api_key=key, moderate=moderate, moderate_threshold=threshold, limits=limits))


def _add_serve(sub):
    p = _verb(sub, "serve", "serve a model: OpenAI-compatible API at /v1 and a web chat page at /",
              "tweetlm serve work/demo/run --port 8000   # then open http://127.0.0.1:8000/", _serve,
              "tweetlm.serve.server.ServeConfig")
    p.add_argument("run", type=Path, metavar="RUN", help="a run folder written by `tweetlm train` (or one of its checkpoints)")
    p.add_argument("--host", help="address to listen on; 0.0.0.0 opens it to the network")
    p.add_argument("--port", type=int, help="port; 0 picks a free one")
    p.add_argument("--model-name", help="the model's name in the API (default: the run folder's name)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 and /metrics (visible in `ps`: "
                                     "prefer --api-key-file)")
    p.add_argument("--api-key-file", metavar="FILE", help="read the API key from this file")
    _add_device(p)
    p.add_argument("--max-batch-size", type=int, help="sequences decoded together")
    p.add_argument("--max-concurrent", dest="limits.max_concurrent", type=int, metavar="N", help="generation requests at once; more get 429")
    p.add_argument("--max-body-kb", type=int, help="largest request body in KiB; more gets 413 (default: ServeLimits, 1 MiB)")
    p.add_argument("--moderate", metavar="SAFETY[:THRESHOLD]", help="a `tweetlm safety train` classifier: serve "
                   "/v1/moderations, refuse requests and replies it scores toxic (at its threshold, or THRESHOLD)")
    p.add_argument("--request-timeout", dest="limits.request_timeout", type=float, metavar="SECONDS",
                   help="longest a request may run, queue included; then 408, or an error event in a stream")
    p.add_argument("--index", type=Path, metavar="INDEX", help="a posts index (`tweetlm index add`; made if missing): serve "
                   "POST /v1/posts and GET /v1/search, and ground chat answers that ask (\"grounding\": true)")
    p.add_argument("--ground", dest="grounding.default", action="store_true", default=None, help="ground every chat answer on --index unless the request "
                   "says \"grounding\": false; answers cite posts as [post:ID], unknown ids are stripped")
    p.add_argument("--ground-k", dest="grounding.k", type=int, metavar="K",
                   help="posts a grounded question retrieves (a request's grounding_k overrides it)")
    p.add_argument("--ground-tokens", dest="grounding.tokens", type=int, metavar="N",
                   help="most prompt tokens the retrieved posts may take; the lowest-ranked are dropped")


def _chat(a):
    from tweetlm.serve.chat import ChatConfig, chat

    chat(_config(ChatConfig, a))


def _add_chat(sub):
    p = _verb(sub, "chat", "chat with a model in the terminal (the server's chat template); /new starts over, /quit ends",
              "tweetlm chat work/demo/run --system 'You answer in one short post.' --seed 1", _chat,
              "tweetlm.serve.chat.ChatConfig")
    p.add_argument("run", type=Path, metavar="RUN", help="a run folder written by `tweetlm train` (a chat fine-tuned one answers best)")
    p.add_argument("--system", help="a system message that opens the conversation")
    p.add_argument("--max-tokens", dest="sampling.max_tokens", type=int, metavar="N", help="at most this many tokens per reply")
    _add_sampling(p, seed_help="make a session reproducible (reply i uses seed + i)")
    _add_device(p)


# ---------------------------------------------------------------- posts index and search


def _index_add(a):
    from tweetlm.search.index import add_files

    add_files(tuple(a.inputs), Path(a.index))


def _search(a):
    import json

    from tweetlm.search.index import Index, format_hits

    with Index(Path(a.index), create=False) as index:
        hits = index.search(a.query, **_keywords(Index.search, a))
    print(json.dumps(hits, ensure_ascii=False, indent=1) if a.json else format_hits(hits))


def _add_index(sub):
    isub = _group(sub, "index", "the posts index that search and grounding read")
    p = _verb(isub, "add", "add posts (any format `data prepare` reads) to a search index; re-added posts are updated",
              "tweetlm index add ../shared/data/twitter-api-v2 'dumps/*.jsonl.zst' --index work/posts.db", _index_add)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs (plain, .gz, .zst, .bz2)")
    p.add_argument("--index", required=True, metavar="INDEX", help="the index file (SQLite), made if missing")


def _duration(text: str) -> float:
    from tweetlm.search.index import parse_duration

    return parse_duration(text)


def _add_search(sub):
    p = _verb(sub, "search", "search an index of posts: BM25 with a recency boost, best first",
              "tweetlm search 'garage tools' --index work/posts.db --since 7d --limit 5", _search,
              "tweetlm.search.index.Index.search")
    p.add_argument("query", metavar="QUERY", help="words to look for (any of them; rarer words count more)")
    p.add_argument("--index", required=True, metavar="INDEX", help="an index file written by `tweetlm index add`")
    p.add_argument("--since", metavar="WHEN", help="only posts from then on: an ISO date or time (2024-05-01, "
                   "2024-05-01T12:00:00Z) or a duration back from now (90m, 24h, 7d, 2w)")
    p.add_argument("--limit", type=int, help="how many posts, at most 1000")
    p.add_argument("--half-life", type=_duration, metavar="DURATION", help="age at which the recency boost halves, "
                   "a duration (90m, 24h, 7d); a new post scores up to 2x an old one; in seconds:")
    p.add_argument("--json", action="store_true", help="print the posts as JSON, with every field and the score")


# ---------------------------------------------------------------- demo


def _demo(a):
    from tweetlm.demo import DemoConfig, demo

    demo(_config(DemoConfig, a, data=tuple(a.data), shared=SHARED_DATA))


def _add_demo(sub):
    p = _verb(sub, "demo", "the whole pipeline on the bundled tweets: prepare, tokenizer, tokenize, ~5 minutes of training, posts",
              "tweetlm demo --minutes 5 --out work/demo", _demo, "tweetlm.demo.DemoConfig")
    p.add_argument("--data", nargs="+", default=[], metavar="INPUT", help="your own posts instead of the bundled tweets")
    p.add_argument("--out", type=Path, help="working folder")
    p.add_argument("--minutes", type=float, help="training time budget")


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
    _add_classify(sub)
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
    args = None
    try:
        args = build_parser().parse_args(argv)
        args._run(args)
    except ConfigError as e:
        flag = _flag_of(args._parser, e.field) if hasattr(args, "_parser") else None
        print(f"tweetlm: error: {f'{flag} {e.value!r}: {e.fix}' if flag else e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"tweetlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tweetlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as coreutils do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except OSError as e:  # what the file system refused (full disk, read-only folder) in any verb: one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"tweetlm: error: {where}{e.strerror or e}; check that the path is writable and has free space",
              file=sys.stderr)
        return 2
    return 0
