"""Byte-level BPE for posts: load, encode, decode, save (trainer.py trains one on a corpus).

Pipeline of the `tokenizers` library, no normalizer (the corpus is already normalized and
decode(encode(s)) == s must hold for any string):
    Split(SPLIT_PATTERN) -> ByteLevel pre-tokenizer -> BPE -> ByteLevel decoder.
Every byte has a token, so any Unicode string encodes with no unknown token.

Special tokens are looked up by name: training puts them at ids 0..5 in the order of
SPECIAL_TOKENS; a byte-level BPE brought from elsewhere (`tweetlm import hf`, a Llama 3 or
GPT-2 style tokenizer.json) gets those it lacks appended after its vocabulary (`adopt`).
They never come out of encoding text: a post that contains the literal "<|endoftext|>" is
encoded as ordinary text and decodes back to it; the stages that need a special token
insert its id (`token_id`).
The saved tokenizer.json is the standard Hugging Face file, where transformers *does* match
special-token strings in text (so chat templates written as strings work there).
"""

import hashlib
import json
from pathlib import Path

from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from tweetlm.errors import UserError
from tweetlm.tokenizer.chat import CHAT_TEMPLATE

# A trained tokenizer holds them at ids 0..5, in this order.
SPECIAL_TOKENS = (
    "<|endoftext|>",  # document boundary: written before every document in the token shards
    "<|pad|>",
    "<|system|>",  # chat roles, each turn closed by <|end|>
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)

# GPT-4's split pattern (cl100k), adapted to posts. Branches are tried in order at each position:
SPLIT_PATTERN = "|".join([
    # English contractions; ’ too, as phones type it.
    r"['’](?i:[sdmt]|ll|ve|re)",
    # A hashtag or mention with its leading space is one unit, digits and underscores included:
    # " @user" (what `data prepare` leaves of a mention) then needs one token.
    r" ?[#@][\p{L}\p{M}\p{N}_]+",
    # A run of emoji. \X (an extended grapheme cluster) keeps each ZWJ sequence, skin tone,
    # flag and keycap whole, so BPE merges whole emoji and runs of them ("😂😂"), never a
    # half-sequence glued to punctuation.
    r" ?(?:(?=[\p{Extended_Pictographic}\p{Regional_Indicator}]|[#*0-9]\x{FE0F}?\x{20E3})\X)+",
    # A word with one leading space or punctuation mark. Marks (\p{M}) belong to words:
    # GPT-4's \p{L}+ cuts Devanagari and vowelled Arabic at every vowel sign.
    r"[^\r\n\p{L}\p{M}\p{N}]?+[\p{L}\p{M}]+",
    # Numbers in groups of 1-2 digits, as nanochat: "2 is the sweet spot for vocab size of 32K.
    # 1 is a bit worse, 3 was worse still" (karpathy/nanochat, nanochat/tokenizer.py); our
    # vocabularies are that size or smaller, which favours short groups further.
    r"\p{N}{1,2}",
    # Punctuation and symbols, then whitespace, as GPT-4.
    r" ?[^\s\p{L}\p{N}]++[\r\n]*",
    r"\s*[\r\n]",
    r"\s+(?!\S)",
    r"\s+",
])

class Tokenizer:
    """A trained byte-level BPE (see docs/CONTRACTS.md). Build with `Tokenizer.load` or `trainer.train_tokenizer`."""

    def __init__(self, tokenizer_json: str):
        self._json = tokenizer_json
        self._tok = HFTokenizer.from_str(tokenizer_json)
        # Special-token strings in text stay text (runtime flag, not saved in tokenizer.json).
        self._tok.encode_special_tokens = True
        self.hash = hashlib.sha256(tokenizer_json.encode()).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        _check_byte_level(self._tok)
        # every special of the file (a Llama 3 tokenizer has 256), ours among them: 0 bytes of text each
        self._all_special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        missing = [name for name in SPECIAL_TOKENS if name not in self._all_special]
        if missing:
            raise UserError(f"this tokenizer.json lacks the special tokens {', '.join(missing)}: train one with "
                            "`tweetlm tokenizer train`, or bring a Hugging Face model in with `tweetlm import hf`")
        self._special_ids = {name: self._all_special[name] for name in SPECIAL_TOKENS}
        self.boundary_id = self._special_ids["<|endoftext|>"]
        self.pad_id = self._special_ids["<|pad|>"]

    @classmethod
    def load(cls, path: Path) -> "Tokenizer":
        """From a TOKENIZER folder or its tokenizer.json."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"no tokenizer at {path}: make one with `tweetlm tokenizer train CORPUS --out {path}`")
        return cls(file.read_bytes().decode())  # bytes, not read_text: no newline translation under the hash

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Rust threads across the batch; the _fast variant skips offsets, which we never use.
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_id(self, name: str) -> int:
        return self._special_ids[name]

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes of each id's text (0 for special tokens), for bits-per-byte.

        Counted from the vocabulary, not from decode: a single token can be part of a UTF-8
        sequence, and ByteLevel spells each byte as exactly one character of its alphabet.
        """
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        special = set(self._all_special.values())
        sizes = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            assert i in special or set(piece) <= alphabet, f"token {i} {piece!r} is not byte-level"
            sizes.append(0 if i in special else len(piece))
        return sizes

    def save(self, folder: Path) -> None:
        """tokenizer.json (byte-exact, so `hash` survives) plus the two files transformers' AutoTokenizer reads
        (with the chat template)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_bytes(self._json.encode())
        specials = {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[0], "pad_token": SPECIAL_TOKENS[1],
                    "additional_special_tokens": list(SPECIAL_TOKENS[2:])}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "chat_template": CHAT_TEMPLATE, **specials}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def adopt(tokenizer_json: str) -> tuple[Tokenizer, list[str]]:
    """A byte-level BPE made elsewhere (GPT-2, Llama 3 ...) as a tweetlm Tokenizer, and the SPECIAL_TOKENS it gained.

    The ones it lacks are appended after its vocabulary, so every id it had keeps its meaning (the model's
    embedding grows to match: `tweetlm.model.hf.import_hf`). Its post-processor goes too (Llama 3's puts
    <|begin_of_text|> in front of every text), so transformers encodes text as tweetlm does, adding nothing.
    A tokenizer that has them all comes back byte-identical, with the same hash.
    """
    hf = HFTokenizer.from_str(tokenizer_json)
    _check_byte_level(hf)
    present = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    missing = [name for name in SPECIAL_TOKENS if name not in present]
    if not missing:
        return Tokenizer(tokenizer_json), []
    hf.post_processor = None
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in missing])
    return Tokenizer(hf.to_str(pretty=True)), missing


def _check_byte_level(tok: HFTokenizer) -> None:
    """Byte-level BPE is what encodes any string without an unknown token and what token_bytes() can count."""
    if not (isinstance(tok.model, BPE) and isinstance(tok.decoder, decoders.ByteLevel)):
        raise UserError(f"this tokenizer.json is not a byte-level BPE (model {type(tok.model).__name__}, decoder "
                        f"{type(tok.decoder).__name__}): tweetlm needs one, as GPT-2 and Llama 3 have; sentencepiece-style "
                        "tokenizers (Llama 2, Mistral) are not supported")
