"""The kit's CLIP-BPE tokenizer: CLIP layout, offline loading by transformers, byte fallback, determinism."""

from __future__ import annotations

import json

import pytest
from transformers import CLIPTokenizer

from sd_scripts_surge.tiny.architecture import TINY_MAX_LENGTH, TINY_VOCAB_SIZE, tiny_te1_config, tiny_te2_config
from sd_scripts_surge.tiny.dataset import caption_vocabulary
from sd_scripts_surge.tiny.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    TE2_PAD_TOKEN,
    ReferenceBPE,
    base_symbols,
    build_tokenizer,
    learn_merges,
)

CAPTION = "a small red circle in the top left on a blue background"


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    texts = [" ".join(caption_vocabulary())]
    te1 = build_tokenizer(root / "tokenizer", texts=texts, pad_token=EOS_TOKEN)
    te2 = build_tokenizer(root / "tokenizer_2", texts=texts, pad_token=TE2_PAD_TOKEN)
    return te1, te2


def test_vocab_layout_matches_clip_and_text_encoders(tokenizer_dirs):
    vocab = json.loads((tokenizer_dirs[0] / "vocab.json").read_text(encoding="utf-8"))
    symbols = base_symbols()
    assert len(set(symbols)) == 256
    assert [vocab[s] for s in symbols] == list(range(256))
    assert [vocab[s + "</w>"] for s in symbols] == list(range(256, 512))
    assert vocab["!"] == 0 and vocab["Ġ"] == 220  # as in CLIP: byte 32 (space) is "Ġ", id 220
    assert vocab[BOS_TOKEN] == tiny_te1_config().bos_token_id == tiny_te2_config().bos_token_id == TINY_VOCAB_SIZE - 2
    assert vocab[EOS_TOKEN] == tiny_te1_config().eos_token_id == TINY_VOCAB_SIZE - 1
    assert max(vocab.values()) < TINY_VOCAB_SIZE and len(set(vocab.values())) == len(vocab)
    merges = (tokenizer_dirs[0] / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    # merge i creates token 512 + i, as in CLIP's vocab
    for i, line in enumerate(merges[1:6]):
        assert vocab[line.replace(" ", "")] == 512 + i


def test_transformers_loads_offline_and_round_trips_caption_words(tokenizer_dirs):
    tok1 = CLIPTokenizer.from_pretrained(str(tokenizer_dirs[0]), local_files_only=True)
    tok2 = CLIPTokenizer.from_pretrained(str(tokenizer_dirs[1]), local_files_only=True)
    assert tok1.model_max_length == tok2.model_max_length == TINY_MAX_LENGTH
    assert tok1.bos_token_id == TINY_VOCAB_SIZE - 2 and tok1.eos_token_id == TINY_VOCAB_SIZE - 1
    assert tok1.pad_token_id == TINY_VOCAB_SIZE - 1 and tok2.pad_token_id == 0
    for word in caption_vocabulary():  # every caption word is one token
        assert len(tok1(word, add_special_tokens=False).input_ids) == 1, word
    ids1 = tok1(CAPTION, padding="max_length", max_length=77, truncation=True).input_ids
    ids2 = tok2(CAPTION, padding="max_length", max_length=77, truncation=True).input_ids
    n = len(CAPTION.split())
    assert len(ids1) == len(ids2) == 77
    assert ids1[0] == ids2[0] == TINY_VOCAB_SIZE - 2
    assert ids1[n + 1] == ids2[n + 1] == TINY_VOCAB_SIZE - 1  # EOS right after the words
    assert set(ids1[n + 2 :]) == {TINY_VOCAB_SIZE - 1} and set(ids2[n + 2 :]) == {0}  # SDXL padding
    assert ids1[: n + 2] == ids2[: n + 2]
    assert tok1.decode(ids1, skip_special_tokens=True) == CAPTION


def test_unknown_words_fall_back_to_bytes_and_agree_with_reference(tokenizer_dirs):
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dirs[0]), local_files_only=True)
    reference = ReferenceBPE(tokenizer_dirs[0])
    for text in ["Zebra crossing über café", "xq7 ✓ 猫 !!", CAPTION.upper(), "a  RED\tcircle"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == reference.encode(text), text
        assert TINY_VOCAB_SIZE - 1 not in ids  # nothing maps to unk (= EOS)
    assert tok.decode(tok("Zebra über", add_special_tokens=False).input_ids) == "zebra über"
    assert tok("a  RED\tcircle").input_ids == tok("a red circle").input_ids


def test_long_prompts_truncate_to_77_with_eos(tokenizer_dirs):
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dirs[0]), local_files_only=True)
    ids = tok(" ".join(["circle"] * 100), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[-1] == TINY_VOCAB_SIZE - 1


def test_build_is_deterministic(tokenizer_dirs, tmp_path):
    again = build_tokenizer(tmp_path / "again", texts=[" ".join(caption_vocabulary())], pad_token=EOS_TOKEN)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (tokenizer_dirs[0] / name).read_bytes(), name


def test_learn_merges_picks_most_frequent_pair_first():
    merges = learn_merges({"aab": 5, "ab": 1}, 3)
    # pairs: (a,a)=5, (a,b</w>)=6 -> ("a", "b</w>") first
    assert merges[0] == ("a", "b</w>")
    assert merges[1] == ("a", "ab</w>")
    assert learn_merges({"x": 3}, 5) == []  # nothing to merge: stops early


def test_bad_pad_token_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="pad_token"):
        build_tokenizer(tmp_path, pad_token="<pad>")
