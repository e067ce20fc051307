"""Token n-gram language model (interpolated Kneser-Ney) for shallow fusion in CTC beam search.

The LM is over the recogniser's own token ids (characters or BPE pieces), trained on text with
the recogniser's tokenizer, so it fuses with any CTC head without a lexicon: at each prefix
extension by token ``c`` the beam score gains ``weight * log P_lm(c | prefix) + length_bonus``,
and a finished hypothesis ``weight * log P_lm(</s> | prefix)`` (Hannun et al. 2014; the
``lm_weight`` / ``word_score`` pair of ESPnet and pyctcdecode, with a per-token bonus here
because the LM is per token). Both are tuned on a validation set, never on the test set
(:func:`tune_fusion`).

Smoothing: interpolated Kneser-Ney (Chen & Goodman 1998) with one discount per order,
``D = n1 / (n1 + 2 n2)`` from the counts of n-grams seen once and twice. Lower orders use
continuation counts (how many distinct tokens precede an n-gram), except for n-grams that
start at ``<s>``, which nothing can precede. The model is stored in backoff form, as an ARPA
file is: for a seen n-gram its interpolated log-probability, for a context its backoff weight,
so a query is a few dictionary lookups. Probabilities are natural logs.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from asrkd.errors import ConfigError, UserError

FORMAT = "asrkd-ngram-1"


class NGramLM:
    """A token n-gram LM in backoff form.

    Queries are memoised (up to ``MEMO_SIZE`` entries); change the tables only through
    :meth:`train` or :meth:`load`.

    Args:
        order: n (the longest n-gram).
        vocab_size: ids ``0..vocab_size-1`` of the tokenizer it was trained with.
        bos_id / eos_id: sentence start and end markers (the tokenizer's bos/eos ids).
        log_probs: per order k (index k-1), context tuple (k-1 ids) -> {token: log P}.
        backoffs: context tuple -> log backoff weight (0 where absent).
        tokenizer: the tokenizer's ``to_dict()``, checked against the recogniser's.
    """

    def __init__(
        self,
        order: int,
        vocab_size: int,
        bos_id: int,
        eos_id: int,
        log_probs: list[dict[tuple[int, ...], dict[int, float]]],
        backoffs: dict[tuple[int, ...], float],
        tokenizer: dict | None = None,
        unigram_floor: float | None = None,
        fusion: dict | None = None,
        words: Iterable[str] | None = None,
    ) -> None:
        self.order = order
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.log_probs = log_probs
        self.backoffs = backoffs
        self.tokenizer = tokenizer
        # Tokens never seen in training text (and not </s>) share the uniform share the
        # unigram level reserved for them.
        self.unigram_floor = unigram_floor if unigram_floor is not None else -math.log(vocab_size)
        # Tuned fusion settings stored with the LM (``asrkd lm --tune``): weight, length_bonus,
        # and what they were tuned on.
        self.fusion = fusion
        self._memo: dict[tuple[tuple[int, ...], int], float] = {}
        # The words of the training text: the lexicon of LMFusion.unk_penalty.
        self.words = frozenset(words or ())
        self.word_prefixes = frozenset(w[:i] for w in self.words for i in range(1, len(w) + 1))
        self._word_pieces: list[tuple[bool, str]] | None = None

    # --- training ---------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        sentences: Iterable[Sequence[int]],
        vocab_size: int,
        bos_id: int,
        eos_id: int,
        order: int = 6,
        tokenizer: dict | None = None,
        words: Iterable[str] | None = None,
    ) -> NGramLM:
        """Count n-grams of ``sentences`` (token id lists) and smooth them (interpolated KN).

        ``tokenizer`` (its ``to_dict()``) and ``words`` (the lexicon) are stored with the LM."""
        if order < 1:
            raise ConfigError(f"order must be >= 1, not {order}")
        counts: list[dict[tuple[int, ...], int]] = [defaultdict(int) for _ in range(order)]
        n_sentences = 0
        for sentence in sentences:
            tokens = [bos_id] * (order - 1) + list(sentence) + [eos_id]
            n_sentences += 1
            start = order - 1
            for i in range(start, len(tokens)):
                # A gram that starts at <s> already holds the whole sentence history; longer
                # ones would only add more <s> (queries back off through them at no cost).
                for k in range(1, order + 1):
                    gram = tuple(tokens[i - k + 1 : i + 1])
                    counts[k - 1][gram] += 1
                    if gram[0] == bos_id:
                        break
        if n_sentences == 0:
            raise UserError("no training sentences for the n-gram LM")
        # Kneser-Ney counts: the highest order and <s>-initial grams keep raw counts; every other
        # lower-order gram counts the distinct tokens seen before it.
        kn: list[dict[tuple[int, ...], int]] = [dict(c) for c in counts]
        for k in range(1, order):
            continuation: dict[tuple[int, ...], int] = defaultdict(int)
            for gram in counts[k]:
                continuation[gram[1:]] += 1
            for gram in kn[k - 1]:
                if gram[0] != bos_id:
                    kn[k - 1][gram] = continuation.get(gram, kn[k - 1][gram])
        discounts = []
        for k in range(order):
            n1 = sum(1 for c in kn[k].values() if c == 1)
            n2 = sum(1 for c in kn[k].values() if c == 2)
            d = n1 / (n1 + 2 * n2) if n1 + n2 > 0 else 0.5
            discounts.append(min(max(d, 0.1), 0.9))
        # Per context: total count and number of distinct followers.
        totals: list[dict[tuple[int, ...], int]] = [defaultdict(int) for _ in range(order)]
        followers: list[dict[tuple[int, ...], int]] = [defaultdict(int) for _ in range(order)]
        for k in range(order):
            for gram, c in kn[k].items():
                totals[k][gram[:-1]] += c
                followers[k][gram[:-1]] += 1
        # Unigrams interpolate with the uniform distribution over the vocabulary (minus <s>).
        log_probs: list[dict[tuple[int, ...], dict[int, float]]] = [{} for _ in range(order)]
        backoffs: dict[tuple[int, ...], float] = {}
        d1, total1, types1 = discounts[0], totals[0][()], followers[0][()]
        uniform = 1.0 / (vocab_size - 1)
        gamma1 = d1 * types1 / total1
        unigram = {}
        for (w,), c in kn[0].items():
            unigram[w] = (max(c - d1, 0.0) / total1) + gamma1 * uniform
        log_probs[0][()] = {w: math.log(p) for w, p in unigram.items()}
        floor = math.log(gamma1 * uniform)

        def lower(gram: tuple[int, ...]) -> float:
            """P of ``gram[-1]`` given ``gram[:-1]`` from the already built lower orders."""
            k = len(gram)
            context, w = gram[:-1], gram[-1]
            table = log_probs[k - 1].get(context)
            if table is not None and w in table:
                return math.exp(table[w])
            if k == 1:
                return math.exp(floor)
            return math.exp(backoffs.get(context, 0.0)) * lower(gram[1:])

        for k in range(2, order + 1):
            d = discounts[k - 1]
            for gram, c in kn[k - 1].items():
                context = gram[:-1]
                total = totals[k - 1][context]
                gamma = d * followers[k - 1][context] / total
                p = max(c - d, 0.0) / total + gamma * lower(gram[1:])
                log_probs[k - 1].setdefault(context, {})[gram[-1]] = math.log(p)
            for context, total in totals[k - 1].items():
                backoffs[context] = math.log(d * followers[k - 1][context] / total)
        return cls(order, vocab_size, bos_id, eos_id, log_probs, backoffs, tokenizer, floor,
                   words=words)

    # --- queries ----------------------------------------------------------------------------

    def word_pieces(self) -> list[tuple[bool, str]]:
        """Per token id, ``(starts a word, text)``, from the tokenizer the LM was trained with."""
        if self._word_pieces is None:
            if self.tokenizer is None:
                raise UserError("this LM stores no tokenizer, so it cannot follow words")
            from asrkd.data.tokenizer import tokenizer_from_dict

            self._word_pieces = tokenizer_from_dict(self.tokenizer).word_pieces()
        return self._word_pieces

    MEMO_SIZE = 1 << 20

    def initial_state(self) -> tuple[int, ...]:
        """The context of a sentence's first token."""
        return (self.bos_id,) * (self.order - 1)

    def log_prob(self, state: tuple[int, ...], token: int) -> float:
        """log P(token | state), ``state`` the last ``order - 1`` tokens (<s>-padded).

        Memoised: beam search asks for the same few contexts over and over."""
        key = (state, token)
        value = self._memo.get(key)
        if value is None:
            if len(self._memo) >= self.MEMO_SIZE:
                self._memo.clear()
            value = self._memo[key] = self._log_prob(state, token)
        return value

    def _log_prob(self, state: tuple[int, ...], token: int) -> float:
        backoff = 0.0
        context = state
        while True:
            table = self.log_probs[len(context)].get(context)
            if table is not None:
                value = table.get(token)
                if value is not None:
                    return backoff + value
            if not context:
                return backoff + self.unigram_floor
            backoff += self.backoffs.get(context, 0.0)
            context = context[1:]

    def advance(self, state: tuple[int, ...], token: int) -> tuple[int, ...]:
        return (state + (token,))[1:] if self.order > 1 else ()

    def score(self, state: tuple[int, ...], token: int) -> tuple[float, tuple[int, ...]]:
        """``(log P(token | state), next state)``."""
        return self.log_prob(state, token), self.advance(state, token)

    def sentence_log_prob(self, tokens: Sequence[int]) -> float:
        """log P(tokens </s>)."""
        state, total = self.initial_state(), 0.0
        for token in tokens:
            value, state = self.score(state, token)
            total += value
        return total + self.log_prob(state, self.eos_id)

    def perplexity(self, sentences: Iterable[Sequence[int]]) -> float:
        """Per-token perplexity (``</s>`` counted as a token), as SRILM's ppl."""
        total, count = 0.0, 0
        for tokens in sentences:
            total += self.sentence_log_prob(tokens)
            count += len(tokens) + 1
        return math.exp(-total / max(count, 1))

    # --- storage ----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        grams = []
        for tables in self.log_probs:
            for context, table in tables.items():
                for token, value in table.items():
                    grams.append([*context, token, round(value, 6)])
        payload = {
            "format": FORMAT,
            "order": self.order,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "unigram_floor": self.unigram_floor,
            "tokenizer": self.tokenizer,
            "fusion": self.fusion,
            "words": sorted(self.words),
            "log_probs": grams,
            "backoffs": [[*context, round(value, 6)] for context, value in self.backoffs.items()],
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, separators=(",", ":")), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> NGramLM:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: n-gram LM not found (make one with `asrkd lm`)")
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload.get("format") != FORMAT:
            raise UserError(f"{path}: not an asrkd n-gram LM (format {payload.get('format')!r})")
        order = int(payload["order"])
        log_probs: list[dict[tuple[int, ...], dict[int, float]]] = [{} for _ in range(order)]
        for row in payload["log_probs"]:
            *gram, value = row
            context = tuple(int(t) for t in gram[:-1])
            log_probs[len(context)].setdefault(context, {})[int(gram[-1])] = float(value)
        backoffs = {tuple(int(t) for t in row[:-1]): float(row[-1]) for row in payload["backoffs"]}
        return cls(order, int(payload["vocab_size"]), int(payload["bos_id"]),
                   int(payload["eos_id"]), log_probs, backoffs, payload.get("tokenizer"),
                   float(payload["unigram_floor"]), payload.get("fusion"),
                   payload.get("words"))

    def fusion_settings(self, weight: float | None = None, length_bonus: float | None = None,
                        unk_penalty: float | None = None) -> LMFusion:
        """An :class:`LMFusion` with the given settings, else the stored tuned ones, else
        weight 0.5, bonus 0, no word penalty (untuned: tune them on validation data)."""
        stored = self.fusion or {}

        def pick(value: float | None, key: str, default: float) -> float:
            return float(value if value is not None else stored.get(key, default))

        return LMFusion(self, pick(weight, "weight", 0.5),
                        pick(length_bonus, "length_bonus", 0.0),
                        pick(unk_penalty, "unk_penalty", 0.0))

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ValueError unless ``tokenizer`` is the one this LM was trained with."""
        if self.tokenizer is not None and self.tokenizer != tokenizer.to_dict():
            raise UserError(
                "the n-gram LM was trained with another tokenizer than the model's: train it "
                "with `asrkd lm --ckpt <this model>`"
            )
        if tokenizer.vocab_size != self.vocab_size:
            raise UserError(f"LM vocabulary {self.vocab_size} vs model {tokenizer.vocab_size}")

    def __repr__(self) -> str:
        grams = sum(len(t) for tables in self.log_probs for t in tables.values())
        return f"NGramLM(order={self.order}, vocab_size={self.vocab_size}, ngrams={grams})"


@dataclass(frozen=True)
class LMFusion:
    """Shallow fusion settings for CTC prefix beam search.

    ``weight`` scales the LM log-probabilities; ``length_bonus`` is added per emitted token
    (it offsets the LM's preference for short outputs). ``unk_penalty`` is subtracted once
    for every word that is not a word of the LM's training text (pyctcdecode's
    ``unk_score_offset``): as soon as a partial word is no prefix of a known word, or when a
    word that is a prefix ends; 0 leaves spelling to the token LM alone.
    """

    lm: NGramLM
    weight: float = 0.5
    length_bonus: float = 0.0
    unk_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.unk_penalty and not self.lm.words:
            raise UserError("unk_penalty needs an LM that stores its training words")


def train_lm(texts: Iterable[str], tokenizer, order: int = 6) -> NGramLM:
    """An :class:`NGramLM` over ``tokenizer``'s ids of ``texts`` (normalised by it)."""
    sentences = [tokenizer.encode(text) for text in texts]
    sentences = [s for s in sentences if s]
    # Words as the recogniser spells them (decode(encode(.)) drops what it cannot write).
    words = {word for tokens in sentences for word in tokenizer.decode(tokens).split()}
    return NGramLM.train(sentences, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id,
                         order=order, tokenizer=tokenizer.to_dict(), words=words)


__all__ = ["LMFusion", "NGramLM", "train_lm"]
