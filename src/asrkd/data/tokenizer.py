"""Tokenizers behind one interface (text normalisation: :mod:`asrkd.data.text`).

Every tokenizer reserves the same five ids so that every output head (CTC, attention, RNN-T)
and every model (teacher, student) share one vocabulary layout:
``0 <blank>, 1 <pad>, 2 <bos>, 3 <eos>, 4 <unk>``, then the symbols.
"""

from __future__ import annotations

import json
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from asrkd.data.text import TextNormalizer
from asrkd.errors import ConfigError, UserError

SPECIAL_TOKENS = ("<blank>", "<pad>", "<bos>", "<eos>", "<unk>")
BLANK_ID, PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(5)


class Tokenizer(ABC):
    """Interface shared by all tokenizers."""

    blank_id = BLANK_ID
    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self, normalizer: TextNormalizer | None = None) -> None:
        self.normalizer = normalizer or TextNormalizer()

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Normalise ``text`` and return its token ids (no bos/eos)."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids``; special ids are skipped."""

    @abstractmethod
    def to_dict(self) -> dict:
        """A JSON-serialisable description from which :func:`tokenizer_from_dict` rebuilds it."""

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")

    @staticmethod
    def load(path: str | Path) -> Tokenizer:
        return tokenizer_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def unknown_symbols(self, text: str) -> set[str]:
        """Characters/pieces of normalised ``text`` the tokenizer maps to ``<unk>``."""
        return set()

    def word_pieces(self) -> list[tuple[bool, str]]:
        """Per id, ``(starts a new word, text it adds to the word)``: what a decoder needs to
        follow word boundaries in a token sequence (special ids add nothing)."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its word pieces")


class CharTokenizer(Tokenizer):
    """One id per character (space included) of the normalised text."""

    def __init__(self, symbols: Iterable[str], normalizer: TextNormalizer | None = None) -> None:
        super().__init__(normalizer)
        self.symbols = list(dict.fromkeys(symbols))
        self.token_to_id = {s: i + len(SPECIAL_TOKENS) for i, s in enumerate(self.symbols)}
        self.id_to_token = list(SPECIAL_TOKENS) + self.symbols

    @classmethod
    def english(cls, normalizer: TextNormalizer | None = None) -> CharTokenizer:
        """Lowercase letters, space and apostrophe: the default for English corpora."""
        return cls([" ", "'", *"abcdefghijklmnopqrstuvwxyz"], normalizer)

    @classmethod
    def from_texts(
        cls, texts: Iterable[str], normalizer: TextNormalizer | None = None
    ) -> CharTokenizer:
        normalizer = normalizer or TextNormalizer()
        symbols = sorted({ch for text in texts for ch in normalizer(text)})
        return cls(symbols, normalizer)

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def encode(self, text: str) -> list[int]:
        return [self.token_to_id.get(ch, UNK_ID) for ch in self.normalizer(text)]

    def decode(self, ids: Iterable[int]) -> str:
        first = len(SPECIAL_TOKENS)
        text = "".join(self.id_to_token[i] for i in ids if first <= i < self.vocab_size)
        return " ".join(text.split())

    def unknown_symbols(self, text: str) -> set[str]:
        return {ch for ch in self.normalizer(text) if ch not in self.token_to_id}

    def word_pieces(self) -> list[tuple[bool, str]]:
        # The space ends a word; the next character starts the next one.
        return [(False, "")] * len(SPECIAL_TOKENS) + [
            (True, "") if s.isspace() else (False, s) for s in self.symbols
        ]

    def to_dict(self) -> dict:
        return {
            "type": "char",
            "symbols": self.symbols,
            "normalizer": asdict(self.normalizer),
        }


class SentencePieceTokenizer(Tokenizer):
    """BPE or unigram subwords from sentencepiece, with our special ids in front."""

    def __init__(self, model_proto: bytes, normalizer: TextNormalizer | None = None) -> None:
        import sentencepiece as spm

        super().__init__(normalizer)
        self.model_proto = model_proto
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        # sentencepiece's own id 0 is its <unk>; ours are shifted past the special tokens.
        self.offset = len(SPECIAL_TOKENS) - 1

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 256,
        model_type: str = "bpe",
        normalizer: TextNormalizer | None = None,
    ) -> SentencePieceTokenizer:
        """Train on ``texts`` (normalised first). ``vocab_size`` counts our special tokens."""
        import sentencepiece as spm

        normalizer = normalizer or TextNormalizer()
        lines = [normalizer(t) for t in texts]
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "text.txt"
            corpus.write_text("\n".join(line for line in lines if line), encoding="utf-8")
            prefix = str(Path(tmp) / "sp")
            spm.SentencePieceTrainer.train(
                input=str(corpus),
                model_prefix=prefix,
                vocab_size=vocab_size - (len(SPECIAL_TOKENS) - 1),
                model_type=model_type,
                character_coverage=1.0,
                unk_id=0,
                bos_id=-1,
                eos_id=-1,
                pad_id=-1,
                hard_vocab_limit=False,
                minloglevel=2,
            )
            proto = Path(prefix + ".model").read_bytes()
        return cls(proto, normalizer)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size() + self.offset

    def encode(self, text: str) -> list[int]:
        pieces = self.processor.encode(self.normalizer(text), out_type=int)
        return [UNK_ID if p == 0 else p + self.offset for p in pieces]

    def decode(self, ids: Iterable[int]) -> str:
        first = len(SPECIAL_TOKENS)
        pieces = [i - self.offset for i in ids if first <= i < self.vocab_size]
        return self.processor.decode(pieces)

    def unknown_symbols(self, text: str) -> set[str]:
        pieces = self.processor.encode(self.normalizer(text), out_type=str)
        return {p for p in pieces if self.processor.piece_to_id(p) == 0}

    def word_pieces(self) -> list[tuple[bool, str]]:
        pieces = [(False, "")] * len(SPECIAL_TOKENS)
        for i in range(1, self.processor.get_piece_size()):
            piece = self.processor.id_to_piece(i)
            pieces.append((piece.startswith("\u2581"), piece.lstrip("\u2581")))
        return pieces

    def to_dict(self) -> dict:
        import base64

        return {
            "type": "sentencepiece",
            "model": base64.b64encode(self.model_proto).decode("ascii"),
            "normalizer": asdict(self.normalizer),
        }


def tokenizer_from_dict(data: dict) -> Tokenizer:
    """Rebuild a tokenizer saved with :meth:`Tokenizer.to_dict` (checkpoints keep this dict)."""
    normalizer = TextNormalizer(**data.get("normalizer", {}))
    kind = data.get("type")
    if kind == "char":
        return CharTokenizer(data["symbols"], normalizer)
    if kind == "sentencepiece":
        import base64

        return SentencePieceTokenizer(base64.b64decode(data["model"]), normalizer)
    raise ConfigError(f"unknown tokenizer type {kind!r} (expected 'char' or 'sentencepiece')")


def build_tokenizer(
    kind: str = "char",
    texts: Iterable[str] | None = None,
    vocab_size: int = 256,
    normalizer: TextNormalizer | None = None,
) -> Tokenizer:
    """One entry point for configs: ``char`` (English letters), ``char_from_data``, ``bpe``,
    ``unigram``."""
    if kind == "char":
        return CharTokenizer.english(normalizer)
    if texts is None:
        raise UserError(f"tokenizer {kind!r} is trained from texts; none were given")
    if kind == "char_from_data":
        return CharTokenizer.from_texts(texts, normalizer)
    if kind in ("bpe", "unigram"):
        return SentencePieceTokenizer.train(texts, vocab_size, kind, normalizer)
    raise ConfigError(f"unknown tokenizer {kind!r}; choose char, char_from_data, bpe or unigram")
