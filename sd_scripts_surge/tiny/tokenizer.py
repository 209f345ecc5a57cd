"""A small CLIP byte-level BPE tokenizer built locally, so the tiny kit needs no hub download.

Layout follows OpenAI CLIP's vocabulary exactly, only shorter:
- ids 0..255: the 256 byte symbols of the byte-level alphabet (GPT-2/CLIP byte→unicode table);
- ids 256..511: the same symbols with the end-of-word marker `</w>`;
- then one id per learned merge, in merge order;
- `<|startoftext|>` and `<|endoftext|>` last (TINY_VOCAB_SIZE-2 and -1, as the text-encoder configs say).

Any word still tokenizes: BPE falls back to its byte symbols, which are all in the vocabulary.

Padding: the TE1 tokenizer pads with `<|endoftext|>` (as CLIP-L in SDXL); the TE2 tokenizer pads with `!`
(id 0), as SDXL's OpenCLIP-G tokenizer_2 and kohya's sd-scripts do. The text encoders pool at the *first*
`<|endoftext|>`, so the pad choice changes only the padded positions of the hidden states — exactly the
difference real SDXL has, which keeps code paths that handle the two tokenizers honest.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from sd_scripts_surge.tiny.architecture import TINY_MAX_LENGTH, TINY_VOCAB_SIZE

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
TE2_PAD_TOKEN = "!"
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"

# Words every tiny tokenizer knows well besides the dataset vocabulary: common prompt words, so that
# held-out and user prompts split into a few pieces rather than single bytes.
BUILTIN_WORDS = (
    "a an the of in on at to with and or for from by photo picture image drawing painting art style "
    "shape shapes object objects background foreground color colour colors bright dark light pale deep "
    "big large small tiny huge little medium one two three four several many some single pair "
    "left right top bottom middle center centre corner side edge near far above below under over beside "
    "round sharp pointed flat smooth simple plain solid outline filled empty "
    "red green blue yellow purple orange white black gray grey pink brown cyan magenta teal gold silver "
    "circle square triangle star diamond cross ring dot line box disk heart moon sun "
    "high quality detailed masterpiece best worst lowres blurry sharp clean noisy "
    "cat dog bird tree house car flower person woman man girl boy face portrait landscape sky water "
    "is are be it this that there here very more most not no"
).split()

# CLIP's pre-tokenizer pattern: specials, contractions, runs of letters, single digits, runs of other
# non-space characters. Python's `re` has no \p{L}; [^\W\d_] is "a letter" in Unicode mode.
_WORD_PATTERN = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+""",
    re.IGNORECASE,
)


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """CLIP/GPT-2 byte→unicode table: printable bytes map to themselves, the rest to code points ≥ 256.

    Insertion order (printable ranges first, then the remapped bytes) fixes ids 0..255, as in CLIP's vocab.
    """
    order = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    order += list(range(ord("®"), ord("ÿ") + 1))
    symbols = [chr(b) for b in order]
    for b in range(256):
        if b not in order:
            order.append(b)
            symbols.append(chr(256 + len(symbols) - 188))
    return dict(zip(order, symbols))


def base_symbols() -> list[str]:
    """The 256 byte symbols in vocabulary order (printable ranges first, then the remapped bytes)."""
    return list(byte_alphabet().values())


def split_words(text: str) -> list[str]:
    """Lower-case, collapse whitespace and split into CLIP pre-tokens (no specials handling needed here)."""
    text = re.sub(r"\s+", " ", text).strip().lower()
    return _WORD_PATTERN.findall(text)


def word_symbols(word: str) -> tuple[str, ...]:
    """A word as its byte symbols, the last one carrying the end-of-word marker."""
    table = byte_alphabet()
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] = symbols[-1] + END_OF_WORD
    return tuple(symbols)


def learn_merges(word_counts: dict[str, int], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair; ties go to the smaller pair (deterministic).

    Stops early when no pair is left (every word is a single symbol).
    """
    words = {word_symbols(w): c for w, c in sorted(word_counts.items()) if w}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        merged_words: dict[tuple[str, str], int] = {}
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            key = tuple(out)
            merged_words[key] = merged_words.get(key, 0) + count
        words = merged_words
    return merges


def build_vocab(merges: list[tuple[str, str]], vocab_size: int = TINY_VOCAB_SIZE) -> dict[str, int]:
    """CLIP vocab order: bytes, bytes+`</w>`, merges, then BOS/EOS at vocab_size-2 / vocab_size-1."""
    symbols = base_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    for left, right in merges:
        tokens.append(left + right)
    if len(tokens) > vocab_size - 2:
        raise ValueError(f"{len(tokens)} tokens do not fit a vocabulary of {vocab_size} (2 ids are for BOS/EOS)")
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    if len(vocab) != len(tokens):
        raise ValueError("merges produced a duplicate token; the merge list is inconsistent")
    vocab[BOS_TOKEN] = vocab_size - 2
    vocab[EOS_TOKEN] = vocab_size - 1
    return vocab


def training_words(extra_texts: Iterable[str] = (), extra_weight: int = 50) -> dict[str, int]:
    """Word counts for BPE: the built-in list once each, dataset/caption words `extra_weight` times each."""
    counts: Counter[str] = Counter()
    for word in BUILTIN_WORDS:
        counts[word] += 1
    for text in extra_texts:
        for word in split_words(text):
            counts[word] += extra_weight
    return dict(counts)


def _tokenizer_config(pad_token: str, vocab_size: int) -> dict:
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": TINY_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(vocab_size - 2): _added_token(BOS_TOKEN),
            str(vocab_size - 1): _added_token(EOS_TOKEN),
        },
    }


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False,
            "special": True}


def build_tokenizer(
    directory: str | Path,
    *,
    texts: Iterable[str] = (),
    pad_token: str = EOS_TOKEN,
    vocab_size: int = TINY_VOCAB_SIZE,
) -> Path:
    """Write `vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json` into `directory`.

    Merges are learned from `texts` (e.g. every caption word the dataset can produce) plus BUILTIN_WORDS,
    filling the vocabulary up to `vocab_size`. Same inputs → same files, byte for byte.
    Use pad_token=EOS_TOKEN for TE1 and TE2_PAD_TOKEN ("!") for TE2, as SDXL does.
    """
    if pad_token not in (EOS_TOKEN, TE2_PAD_TOKEN):
        raise ValueError(f"pad_token must be {EOS_TOKEN!r} (TE1) or {TE2_PAD_TOKEN!r} (TE2), got {pad_token!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    num_merges = vocab_size - 2 - 2 * len(base_symbols())
    merges = learn_merges(training_words(texts), num_merges)
    vocab = build_vocab(merges, vocab_size)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    merge_lines = [MERGES_HEADER] + [f"{left} {right}" for left, right in merges]
    (directory / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    config = _tokenizer_config(pad_token, vocab_size)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return directory


class ReferenceBPE:
    """Our own CLIP-BPE encoder over the written files: used by tests to check `transformers` agrees."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.vocab: dict[str, int] = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
        pairs = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#")]
        self.ranks = {pair: rank for rank, pair in enumerate(pairs)}

    def encode_word(self, word: str) -> list[int]:
        symbols = list(word_symbols(word))
        while len(symbols) > 1:
            candidates = [(self.ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
            rank, index = min(candidates)
            if rank == 1 << 30:
                break
            symbols[index : index + 2] = [symbols[index] + symbols[index + 1]]
        return [self.vocab[s] for s in symbols]

    def encode(self, text: str) -> list[int]:
        """Ids without BOS/EOS or padding."""
        return [i for word in split_words(text) for i in self.encode_word(word)]
