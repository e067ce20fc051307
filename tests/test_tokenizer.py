"""Tokenizers: normalisation policy, round trips, save/load, special ids."""

from __future__ import annotations

import pytest

from asrkd.data.text import number_to_words, ordinal_words, year_words
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
        TextNormalizer(digits="roman")
    # For tokenizers that normalise by themselves (an imported NeMo model's SentencePiece).
    assert TextNormalizer(passthrough=True)("Don't stop, it's 1985!") == "Don't stop, it's 1985!"


def test_number_to_words_one_speller_two_readings():
    assert number_to_words(0) == "zero"
    assert number_to_words(42) == "forty two"
    assert number_to_words(1_000_017) == "one million seventeen"
    assert number_to_words(105) == "one hundred five"
    assert number_to_words(105, british=True) == "one hundred and five"
    assert number_to_words(2005, british=True) == "two thousand and five"
    assert number_to_words(2305, british=True) == "two thousand three hundred and five"
    assert ordinal_words(22) == "twenty second" and ordinal_words(30) == "thirtieth"
    assert year_words(1905) == "nineteen oh five" and year_words(1800) == "eighteen hundred"
    with pytest.raises(ValueError, match="out of range"):
        number_to_words(10**9)


def test_normalizer_reads_long_digit_runs_digit_by_digit_and_can_keep_ascii_only():
    norm = TextNormalizer()
    assert norm("call 5551234567") == "call five five five one two three four five six seven"
    assert norm("Caf\u00e9 105") == "caf\u00e9 one hundred five"
    corpus_style = TextNormalizer(british_numbers=True, ascii_letters=True)
    assert corpus_style("Caf\u00e9 105") == "caf one hundred and five"


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
