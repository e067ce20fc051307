"""Text: numbers spelled as words and the one transcript normaliser.

Both the tokenizers (user transcripts, before tokenisation) and the embedded corpus (its
generated sentences) normalise through :class:`TextNormalizer`; they differ only in its
settings, so a rule fixed here is fixed for both.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from asrkd.errors import ConfigError

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINAL_WORDS = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
    "nine": "ninth", "twelve": "twelfth",
}  # fmt: skip
DIGIT_WORDS = tuple(_ONES[:10])


def number_to_words(n: int, british: bool = False) -> str:
    """Spell a non-negative integer below one billion in English words.

    ``british`` puts "and" before the last part below a hundred, as British English says it
    ("one hundred and five", "two thousand and five"; "two thousand three hundred" keeps none);
    otherwise "one hundred five".
    """
    if n < 0 or n >= 10**9:
        raise ValueError(f"number out of range: {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    for size, word in ((10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            high, rest = divmod(n, size)
            head = f"{number_to_words(high, british)} {word}"
            if rest == 0:
                return head
            joiner = " and " if british and rest < 100 else " "
            return head + joiner + number_to_words(rest, british)
    raise AssertionError("unreachable")


def ordinal_words(n: int, british: bool = False) -> str:
    """Spell an ordinal: 1 -> "first", 22 -> "twenty second", 30 -> "thirtieth"."""
    words = number_to_words(n, british).split()
    last = words[-1]
    if last in _ORDINAL_WORDS:
        last = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join(words[:-1] + [last])


def year_words(year: int, british: bool = False) -> str:
    """Read a year as people say it: 1984 -> "nineteen eighty four", 1905 -> "nineteen oh five"."""
    if 2000 <= year <= 2009:
        return number_to_words(year, british)
    high, low = divmod(year, 100)
    if low == 0:
        return f"{number_to_words(high, british)} hundred"
    low_words = number_to_words(low, british) if low >= 10 else f"oh {number_to_words(low)}"
    return f"{number_to_words(high, british)} {low_words}"


_DIGIT_RUN = re.compile(r"\d+")
_NOT_ASCII_WORD = re.compile(r"[^a-z' ]+")


@dataclass(frozen=True)
class TextNormalizer:
    """The explicit text policy applied to transcripts before tokenisation.

    Args:
        lowercase: fold case.
        digits: "spell" writes digit runs as English words, "keep" leaves them, "drop" removes.
        keep_apostrophes: keep ``'`` inside words (don't, it's); otherwise remove it.
        punctuation: "remove" deletes other punctuation, "keep" leaves it.
        british_numbers: spell numbers with "and" ("one hundred and five").
        ascii_letters: keep only a-z, apostrophes and spaces (other characters become spaces).
        passthrough: hand the text over unchanged and ignore the options above: for a
            tokenizer that normalises by itself, such as an imported NeMo model's SentencePiece
            (NeMo tokenises raw transcripts, case and punctuation included).
    """

    lowercase: bool = True
    digits: str = "spell"
    keep_apostrophes: bool = True
    punctuation: str = "remove"
    british_numbers: bool = False
    ascii_letters: bool = False
    passthrough: bool = False

    def __post_init__(self) -> None:
        if self.digits not in ("spell", "keep", "drop"):
            raise ConfigError(f"digits must be spell|keep|drop, got {self.digits!r}")
        if self.punctuation not in ("remove", "keep"):
            raise ConfigError(f"punctuation must be remove|keep, got {self.punctuation!r}")

    def _spell(self, digits: str) -> str:
        if len(digits) > 9:  # phone, account and serial numbers are read digit by digit
            return " ".join(_ONES[int(d)] for d in digits)
        return number_to_words(int(digits), self.british_numbers)

    def __call__(self, text: str) -> str:
        if self.passthrough:
            return text
        text = unicodedata.normalize("NFKC", text)
        text = text.replace("\u2019", "'").replace("\u2018", "'")
        if self.lowercase:
            text = text.lower()
        if self.digits == "spell":
            text = _DIGIT_RUN.sub(lambda m: " " + self._spell(m.group()) + " ", text)
        elif self.digits == "drop":
            text = _DIGIT_RUN.sub(" ", text)
        if self.ascii_letters:
            text = _NOT_ASCII_WORD.sub(" ", text)
        if self.keep_apostrophes:
            # An apostrophe is kept only inside a word: quotes around words are punctuation.
            text = re.sub(r"(?<![\w])'|'(?![\w])", " ", text)
        else:
            text = text.replace("'", "")
        if self.punctuation == "remove":
            text = "".join(
                ch if (ch.isalnum() or ch.isspace() or ch == "'") else " " for ch in text
            )
        return " ".join(text.split())
