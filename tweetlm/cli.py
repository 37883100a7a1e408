"""tweetlm VERB ...: a thin layer that parses flags and calls one stage function per verb.

Stage modules are imported inside each verb, so `tweetlm --help` stays instant.
A UserError from any stage becomes one line on stderr and exit code 2.
"""

import argparse
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


def _verb(sub, name: str, help: str, example: str, run) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=f"{help}\n\nexample:\n  {example}", formatter_class=_formatter)
    p.set_defaults(run=run)
    return p


# ---------------------------------------------------------------- data


def _data_prepare(a):
    from tweetlm.data.prepare import PrepareConfig, prepare

    prepare(PrepareConfig(
        inputs=tuple(a.inputs), out=Path(a.out), workers=a.workers, lang=tuple(a.lang.split(",")) if a.lang else (),
        min_chars=a.min_chars, max_chars=a.max_chars, keep_reposts=a.keep_reposts, drop_spam=not a.keep_spam,
        drop_top_authors=a.drop_top_authors, near_dup_threshold=a.near_dup, val_ratio=a.val_ratio,
        test_ratio=a.test_ratio, mentions=not a.keep_mentions, links=not a.keep_links, seed=a.seed,
    ))


def _data_tokenize(a):
    from tweetlm.data.tokens import TokenizeConfig, tokenize

    tokenize(TokenizeConfig(corpus=Path(a.corpus), tokenizer=Path(a.tokenizer), out=Path(a.out), workers=a.workers))


def _data_fetch(a):
    from tweetlm.data.fetch import fetch_tweeteval

    fetch_tweeteval(out=Path(a.out), local=Path(a.from_dir) if a.from_dir else None)


def _add_data(sub):
    data = sub.add_parser("data", help="read, clean and tokenize posts", formatter_class=_formatter)
    dsub = data.add_subparsers(dest="action", required=True, metavar="ACTION")

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
    p.add_argument("--val-ratio", type=float, default=0.05, help="share of conversations in val (default 0.05)")
    p.add_argument("--test-ratio", type=float, default=0.05, help="share of conversations in test (default 0.05)")
    p.add_argument("--keep-mentions", action="store_true", help="keep @handles (default: replace with @user)")
    p.add_argument("--keep-links", action="store_true", help="keep URLs (default: replace with http)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split hash and MinHash (default 0)")

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


# ---------------------------------------------------------------- tokenizer


def _tokenizer_train(a):
    from tweetlm.tokenizer.bpe import TokenizerConfig, train_tokenizer

    train_tokenizer(TokenizerConfig(corpus=Path(a.corpus), out=Path(a.out), vocab_size=a.vocab_size))


def _add_tokenizer(sub):
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer", formatter_class=_formatter)
    tsub = tok.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = _verb(tsub, "train", "train byte-level BPE on the corpus's train split; prints bytes per token on val",
              "tweetlm tokenizer train work/corpus --vocab-size 8192 --out work/tokenizer", _tokenizer_train)
    p.add_argument("corpus", metavar="CORPUS", help="a folder written by `tweetlm data prepare`")
    p.add_argument("--vocab-size", type=int, default=16384, help="vocabulary size, special tokens included (default 16384)")
    p.add_argument("--out", required=True, metavar="TOKENIZER", help="output folder for tokenizer.json")


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
    return 0
