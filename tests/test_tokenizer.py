"""Tokenizers: normalisation policy, round trips, save/load, special ids."""

from __future__ import annotations

import pytest

from asrkd.data.tokenizer import (
    BLANK_ID,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    CharTokenizer,
    SentencePieceTokenizer,
    TextNormalizer,
    Tokenizer,
    build_tokenizer,
    number_to_words,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Don't stop believing, it's 1985!",
    "printing in the only sense with which we are at present concerned",
    "'Quoted' words and rock'n'roll",
]


def test_normalizer_policy_is_explicit():
    norm = TextNormalizer()
    assert norm("Don't stop, it's 1985!") == "don't stop it's one thousand nine hundred eighty five"
    assert norm("'Quoted' words") == "quoted words"
    assert TextNormalizer(keep_apostrophes=False)("Don't") == "dont"
    assert TextNormalizer(digits="drop")("room 101 now") == "room now"
    assert TextNormalizer(digits="keep", lowercase=False)("Room 101") == "Room 101"
    assert TextNormalizer(punctuation="keep")("hi, there") == "hi, there"
    with pytest.raises(ValueError, match="digits"):
        TextNormalizer(digits="roman")("x")


def test_number_to_words():
    assert number_to_words(0) == "zero"
    assert number_to_words(42) == "forty two"
    assert number_to_words(1_000_017) == "one million seventeen"


def test_special_ids_are_shared():
    for tokenizer in (CharTokenizer.english(), SentencePieceTokenizer.train(SENTENCES * 5, 40)):
        assert (tokenizer.blank_id, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (
            BLANK_ID, PAD_ID, BOS_ID, EOS_ID)
        ids = tokenizer.encode(SENTENCES[0])
        assert min(ids) > UNK_ID


@pytest.mark.parametrize("kind", ["char", "char_from_data", "bpe", "unigram"])
def test_round_trip_and_save_load(kind, tmp_path):
    tokenizer = build_tokenizer(kind, texts=SENTENCES * 5, vocab_size=48)
    norm = tokenizer.normalizer
    for sentence in SENTENCES:
        assert tokenizer.decode(tokenizer.encode(sentence)) == norm(sentence)
    tokenizer.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    assert type(loaded) is type(tokenizer)
    assert loaded.vocab_size == tokenizer.vocab_size
    for sentence in SENTENCES:
        assert loaded.encode(sentence) == tokenizer.encode(sentence)


def test_unknown_symbols_map_to_unk_and_are_reported():
    tokenizer = CharTokenizer.english(TextNormalizer(digits="keep"))
    assert tokenizer.unknown_symbols("abc 7") == {"7"}
    assert UNK_ID in tokenizer.encode("abc 7")
    assert tokenizer.decode([BOS_ID, *tokenizer.encode("hi"), EOS_ID, PAD_ID]) == "hi"


def test_unknown_tokenizer_kind_is_named():
    with pytest.raises(ValueError, match="wordpiece"):
        build_tokenizer("wordpiece", texts=["a"])
