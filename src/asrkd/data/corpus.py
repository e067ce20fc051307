"""The embedded default corpus: offline, synthetic, multi-speaker English speech.

:func:`build_corpus` writes a small ASR corpus that needs no download: sentences come from a
grammar over the project's own word lists (:mod:`asrkd.data.corpus_vocab`), audio from espeak-ng
(:mod:`asrkd.data.tts`) with many accent x voice-variant "speakers", and light augmentation
(per-utterance rate/pitch, speed perturbation, gain, coloured noise). Output layout::

    out_dir/
      wav/{train,val,test}/<id>.wav     16-bit PCM mono
      train.jsonl val.jsonl test.jsonl  NeMo-style manifests
      stats.json                        written last: its presence marks a finished build

Each manifest line is ``{"audio_filepath": "wav/train/train_000000.wav", "duration": 2.53,
"text": "...", "speaker": "en-us+f3"}`` with the path relative to the manifest's folder.

Reproducibility: texts and speaker assignment come from generators seeded with the corpus seed;
each utterance's augmentation and espeak's own noise seed from ``(seed, split, index)``.
espeak-ng's wave generator also carries state from one utterance to the next within a process,
so audio is rendered in fixed chunks of utterances, each chunk in a fresh worker process: the
result is bit-identical whatever the number of workers or their scheduling.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from asrkd.data import corpus_vocab as V
from asrkd.data import text as _text
from asrkd.data.text import DIGIT_WORDS, TextNormalizer
from asrkd.data.tts import RATE_MAX, EspeakSynthesizer
from asrkd.errors import UserError

__all__ = [
    "CORPUS_VERSION",
    "SPLITS",
    "KINDS",
    "build_corpus",
    "generate_digits",
    "generate_sentences",
    "normalize_text",
]

# Bump when anything that changes the output (grammar, vocabulary, augmentation) changes, so that
# an existing corpus built by older code is not reused.
CORPUS_VERSION = 2
SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}

MIN_DURATION = 1.0  # seconds, inclusive bounds for every written file
MAX_DURATION = 8.0
_MAX_WORDS = 20  # longer sentences would need an implausibly fast rate to fit in MAX_DURATION
_CHUNK = 25  # utterances per worker process (see the module docstring)

# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

# The corpus's text policy: lowercase a-z, apostrophes inside words and single spaces; digits
# spelled as British English reads them ("one hundred and five"), other characters -> spaces.
normalize_text = TextNormalizer(british_numbers=True, ascii_letters=True)
# ... and the same reading wherever a sentence template spells a number.
number_to_words = partial(_text.number_to_words, british=True)
ordinal_words = partial(_text.ordinal_words, british=True)
year_words = partial(_text.year_words, british=True)


# Word lists longer than this are cut to a core vocabulary (see SentenceGenerator).
_OPEN_CLASS = 12
_CORE_SCALE = 3.0  # a list of n words keeps round(_CORE_SCALE * sqrt(n)) of them
_ZIPF_EXPONENT = 0.9


def _core_table(words: tuple) -> tuple[tuple, np.ndarray]:
    """A list's core words in frequency-rank order and their cumulative Zipf probabilities.

    The order is a fixed permutation of the list (from a checksum of its contents, so the
    vocabulary does not depend on the corpus seed or on the order words were written in, which
    is alphabetical in places). Short (closed-class) lists keep every word, uniformly.
    """
    if len(words) <= _OPEN_CLASS:
        return words, np.linspace(1 / len(words), 1.0, len(words))
    order = np.random.default_rng(zlib.crc32(repr(words).encode())).permutation(len(words))
    keep = min(len(words), max(_OPEN_CLASS, round(_CORE_SCALE * np.sqrt(len(words)))))
    core = tuple(words[i] for i in order[:keep])
    weights = 1.0 / np.arange(1, keep + 1) ** _ZIPF_EXPONENT
    return core, np.cumsum(weights / weights.sum())


class SentenceGenerator:
    """Random grammatical (if often whimsical) English sentences from the project word lists.

    Every template produces words from :mod:`asrkd.data.corpus_vocab`, spelled-out numbers and a
    few fixed function words; lengths range from two words to about twenty.

    Vocabulary sized to the data: an open-class list of n words (names, nouns, verbs,
    adjectives, ...) contributes only a core of about ``3 * sqrt(n)`` of them (805 nouns -> 85),
    drawn with Zipf-like frequencies (rank ** -0.9), as words are in natural text. Uniform draws
    from the full lists gave 3,291 training words, each heard about 7 times in 3,000 sentences,
    so 30 % of test words had been heard at most 5 times: no recogniser spells such words from
    so few examples. With the core vocabulary the corpus has about 1,000 word types (with their
    inflections), most heard dozens of times; test sentences are still new combinations.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self._tables: dict[int, tuple[tuple[str, ...], np.ndarray]] = {}
        self._templates = [
            (self._short, 1.0),
            (self._past_transitive, 3.0),
            (self._past_intransitive, 2.0),
            (self._present, 2.0),
            (self._modal, 2.0),
            (self._negation, 1.0),
            (self._copula, 1.5),
            (self._there_are, 1.0),
            (self._question, 1.5),
            (self._imperative, 1.0),
            (self._reported, 1.0),
            (self._money, 0.5),
            (self._date_time, 1.0),
            (self._digits, 0.3),
            (self._compound, 2.5),
        ]
        weights = np.array([w for _, w in self._templates])
        self._weights = weights / weights.sum()

    # -- small helpers ------------------------------------------------------------------------
    def pick(self, seq):  # noqa: ANN001, ANN201 - any sequence
        """One item: uniform for short lists, from the Zipf-weighted core of long word lists."""
        if len(seq) <= _OPEN_CLASS:
            return seq[int(self.rng.integers(len(seq)))]
        table = self._tables.get(id(seq))
        if table is None:
            table = self._tables[id(seq)] = _core_table(tuple(seq))
        core, cumulative = table
        return core[min(int(np.searchsorted(cumulative, self.rng.random())), len(core) - 1)]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def name(self) -> str:
        return self.pick(V.NAMES)

    def place(self) -> str:
        return self.pick(V.MULTIWORD_PLACES) if self.chance(0.12) else self.pick(V.PLACES)

    def adjs(self, p_one: float = 0.5, p_two: float = 0.12) -> str:
        r = self.rng.random()
        if r < p_two:
            return f"{self.pick(V.ADJECTIVES)} {self.pick(V.ADJECTIVES)}"
        if r < p_one:
            return self.pick(V.ADJECTIVES)
        return ""

    def noun_phrase(self, nouns: tuple[str, ...] = V.NOUNS) -> tuple[str, bool]:
        """A noun phrase and whether it is singular (for verb agreement)."""
        noun = self.pick(nouns)
        r = self.rng.random()
        if r < 0.45:
            det = self.pick(V.DETERMINERS)
            adj = self.adjs()
            if det == "a" and (adj or noun)[0] in "aeiou":
                det = "an"
            return _join(det, adj, noun), True
        if r < 0.6:
            return _join(self.pick(V.POSSESSIVES), self.adjs(0.3, 0.0), noun), True
        if r < 0.72:
            return _join(self.name() + "'s", self.adjs(0.3, 0.0), noun), True
        if r < 0.86:
            det = self.pick(V.PLURAL_DETERMINERS)
            return _join(det, self.adjs(0.4, 0.05), V.plural(noun)), False
        count = self.small_number()
        word = noun if count == 1 else V.plural(noun)
        return _join(number_to_words(count), self.adjs(0.3, 0.0), word), count == 1

    def small_number(self) -> int:
        r = self.rng.random()
        if r < 0.6:
            return int(self.rng.integers(2, 13))
        if r < 0.9:
            return int(self.rng.integers(13, 100))
        return int(self.rng.integers(100, 1000))

    def subject(self) -> tuple[str, bool]:
        """A sentence subject and whether it takes a third-person-singular verb."""
        r = self.rng.random()
        if r < 0.35:
            return self.name(), True
        if r < 0.5:
            pron = self.pick(V.SUBJECT_PRONOUNS)
            return pron, pron in ("he", "she")
        if r < 0.58:
            return f"{self.name()} and {self.name()}", False
        return self.noun_phrase(self.pick((V.PEOPLE, V.ANIMALS, V.PEOPLE)))

    def obj(self) -> str:
        r = self.rng.random()
        if r < 0.75:
            return self.noun_phrase()[0]
        if r < 0.87:
            return self.name()
        return self.pick(V.OBJECT_PRONOUNS)

    def where(self) -> str:
        r = self.rng.random()
        if r < 0.3:
            return f"in {self.place()}"
        if r < 0.55:
            return f"at the {self.pick(V.LOCATIONS)}"
        return _join(self.pick(V.PREPOSITIONS), "the", self.adjs(0.25, 0.0), self.pick(V.NOUNS))

    def when(self) -> str:
        r = self.rng.random()
        if r < 0.45:
            return self.pick(V.TIME_PHRASES)
        if r < 0.65:
            return f"on {self.pick(V.WEEKDAYS)}"
        if r < 0.8:
            return f"in {self.pick(V.MONTHS)}"
        if r < 0.9:
            return f"in the {self.pick(V.SEASONS)}"
        return f"at {self.clock_time()}"

    def clock_time(self) -> str:
        hour = number_to_words(int(self.rng.integers(1, 13)))
        r = self.rng.random()
        if r < 0.3:
            return f"{hour} o'clock"
        if r < 0.45:
            return f"half past {hour}"
        if r < 0.55:
            return f"quarter to {hour}"
        minute = int(self.rng.integers(1, 60))
        return f"{hour} {'oh ' if minute < 10 else ''}{number_to_words(minute)}"

    def extras(self, p_where: float = 0.4, p_when: float = 0.3) -> str:
        return _join(
            self.where() if self.chance(p_where) else "", self.when() if self.chance(p_when) else ""
        )

    # -- templates: each returns a sentence ---------------------------------------------------
    def _short(self) -> str:
        r = self.rng.random()
        if r < 0.3:
            return f"{self.name()} {self.pick(V.INTRANSITIVE_VERBS)[1]}"
        if r < 0.55:
            greeting = self.pick(
                (
                    "hello",
                    "thank you",
                    "good morning",
                    "good night",
                    "goodbye",
                    "welcome back",
                    "sorry",
                    "well done",
                    "see you soon",
                )
            )
            return f"{greeting} {self.name()}"
        if r < 0.8:
            return _join(self.adjs(1.0, 0.0), V.plural(self.pick(V.NOUNS)))
        link = self.pick(("again", "please", "at last", "or", "and"))
        return f"{self.place()} {link} {self.place()}"

    def _past_transitive(self) -> str:
        subj, _ = self.subject()
        adv = self.pick(V.ADVERBS) if self.chance(0.2) else ""
        return _join(subj, adv, self.pick(V.TRANSITIVE_VERBS)[1], self.obj(), self.extras())

    def _past_intransitive(self) -> str:
        subj, _ = self.subject()
        adv = self.pick(V.ADVERBS) if self.chance(0.5) else ""
        return _join(subj, self.pick(V.INTRANSITIVE_VERBS)[1], adv, self.extras(0.5, 0.4))

    def _present(self) -> str:
        subj, third = self.subject()
        transitive = self.chance(0.6)
        base = self.pick(V.TRANSITIVE_VERBS if transitive else V.INTRANSITIVE_VERBS)[0]
        verb = V.third_person(base) if third else base
        freq = self.pick(("always", "often", "sometimes", "never", "usually", "rarely"))
        return _join(
            subj,
            freq if self.chance(0.35) else "",
            verb,
            self.obj() if transitive else "",
            self.extras(0.35, 0.2),
        )

    def _modal(self) -> str:
        subj, _ = self.subject()
        verb = self.pick(V.TRANSITIVE_VERBS)[0]
        return _join(subj, self.pick(V.MODALS), verb, self.obj(), self.extras(0.35, 0.35))

    def _negation(self) -> str:
        subj, third = self.subject()
        neg = self.pick(V.NEGATED_MODALS)
        if neg == "don't" and third:
            neg = "doesn't"
        tail = ""
        if self.chance(0.4):
            tail = f"because it was too {self.pick(V.ADJECTIVES)}"
        return _join(subj, neg, self.pick(V.TRANSITIVE_VERBS)[0], self.obj(), tail)

    def _copula(self) -> str:
        r = self.rng.random()
        intens = (
            self.pick(("very", "quite", "rather", "really", "so", "not", ""))
            if self.chance(0.5)
            else ""
        )
        if r < 0.4:
            np_, singular = self.noun_phrase()
            verb = (
                self.pick(("is", "was", "seems", "looks"))
                if singular
                else self.pick(("are", "were", "seem", "look"))
            )
            return _join(np_, verb, intens, self.pick(V.ADJECTIVES))
        if r < 0.7:
            return _join(
                self.place(),
                self.pick(("is", "was")),
                intens,
                self.pick(V.ADJECTIVES),
                f"in the {self.pick(V.SEASONS)}",
            )
        return _join(
            f"{self.name()}'s",
            self.pick(V.NOUNS),
            "is",
            intens,
            self.pick(V.ADJECTIVES),
            f"and {self.pick(V.ADJECTIVES)}" if self.chance(0.4) else "",
        )

    def _there_are(self) -> str:
        count = self.small_number()
        noun = self.pick(V.NOUNS)
        be = self.pick(("is", "was")) if count == 1 else self.pick(("are", "were"))
        return _join(
            "there",
            be,
            number_to_words(count),
            self.adjs(0.4, 0.05),
            noun if count == 1 else V.plural(noun),
            self.where(),
        )

    def _question(self) -> str:
        r = self.rng.random()
        verb = self.pick(V.TRANSITIVE_VERBS)[0]
        if r < 0.3:
            return _join(
                "did",
                self.pick(("you", "they", "we", self.name())),
                verb,
                self.obj(),
                self.when() if self.chance(0.4) else "",
            )
        if r < 0.55:
            return _join(self.pick(V.QUESTION_WORDS), "did", self.name(), verb, self.obj())
        if r < 0.7:
            return _join("how many", V.plural(self.pick(V.NOUNS)), "did", self.name(), verb)
        if r < 0.85:
            return _join(
                self.pick(("can", "could", "would", "will")),
                "you",
                verb,
                self.obj(),
                "please" if self.chance(0.5) else "",
            )
        np_, singular = self.noun_phrase()
        return _join("is" if singular else "are", np_, self.pick(V.ADJECTIVES))

    def _imperative(self) -> str:
        verb = self.pick(V.TRANSITIVE_VERBS)[0]
        head = self.pick(("please", "don't", "never", "always", "", ""))
        tail = ""
        if self.chance(0.4):
            verb3 = V.third_person(self.pick(V.INTRANSITIVE_VERBS)[0])
            tail = f"before the {self.pick(V.NOUNS)} {verb3}"
        return _join(head, verb, self.obj(), self.where() if self.chance(0.3) else "", tail)

    def _reported(self) -> str:
        subj, _ = self.subject()
        return _join(subj, self.pick(V.SPEECH_VERBS), "that", self._past_transitive())

    def _money(self) -> str:
        amount = number_to_words(self.small_number())
        cents = (
            f"and {number_to_words(int(self.rng.integers(1, 100)))} cents"
            if self.chance(0.3)
            else ""
        )
        noun_phrase, singular = self.noun_phrase(V.FOODS + V.OBJECTS)
        verb = self.pick(("costs", "cost")) if singular else "cost"
        return _join(noun_phrase, verb, amount, self.pick(V.CURRENCIES), cents)

    def _date_time(self) -> str:
        r = self.rng.random()
        if r < 0.35:
            event = self.pick(
                (
                    "party",
                    "meeting",
                    "wedding",
                    "concert",
                    "exam",
                    "interview",
                    "holiday",
                    "festival",
                    "appointment",
                    "birthday",
                )
            )
            return _join(
                f"{self.name()}'s",
                event,
                "is on",
                self.pick(V.WEEKDAYS),
                "the",
                ordinal_words(int(self.rng.integers(1, 32))),
                "of",
                self.pick(V.MONTHS),
            )
        if r < 0.65:
            vehicle = self.pick(("train", "bus", "plane", "ferry", "coach", "tram", "flight"))
            return _join(
                "the",
                vehicle,
                "to",
                self.place(),
                self.pick(("leaves", "arrives")),
                "at",
                self.clock_time(),
            )
        year = int(self.rng.integers(1800, 2030))
        return _join(
            self.name(),
            self.pick(("was born", "moved to " + self.place(), "started school", "got married")),
            "in",
            year_words(year),
        )

    def _digits(self) -> str:
        n = int(self.rng.integers(4, 9))
        digits = " ".join(DIGIT_WORDS[int(d)] if d else "oh" for d in self.rng.integers(0, 10, n))
        return f"{self.pick(('my', 'your', 'her', 'his', 'the'))} number is {digits}"

    def _compound(self) -> str:
        simple = (
            self._past_transitive,
            self._past_intransitive,
            self._present,
            self._modal,
            self._copula,
        )
        first = self.pick(simple)()
        second = self.pick(simple)()
        return _join(first, self.pick(V.CONJUNCTIONS), second)

    def sentence(self) -> str:
        """One normalised sentence of 2.._MAX_WORDS words."""
        while True:
            index = int(self.rng.choice(len(self._templates), p=self._weights))
            text = normalize_text(self._templates[index][0]())
            if 2 <= len(text.split()) <= _MAX_WORDS:
                return text


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def generate_digits(n: int, seed: int) -> list[str]:
    """``n`` single digit words ("zero" .. "nine"), each digit equally often, shuffled.

    The text of a spoken-digit corpus (as the Free Spoken Digit Dataset): a synthetic one with
    hundreds of voices adds the speaker variety that a few real speakers lack.
    """
    rng = np.random.default_rng([seed, 0xD1617])
    digits = np.resize(np.array(DIGIT_WORDS), n)
    return [str(d) for d in rng.permutation(digits)]


def generate_sentences(n: int, seed: int) -> list[str]:
    """``n`` distinct normalised sentences, deterministic given ``seed``."""
    gen = SentenceGenerator(np.random.default_rng([seed, 0x7E47]))
    seen: dict[str, None] = {}
    attempts = 0
    while len(seen) < n:
        seen.setdefault(gen.sentence(), None)
        attempts += 1
        if attempts > 20 * n + 1000:  # the grammar has far more sentences than any sane n
            raise RuntimeError(f"could not generate {n} distinct sentences")
    return list(seen)


# Text generator and shortest file of each corpus kind.
KINDS = {"sentences": (generate_sentences, MIN_DURATION), "digits": (generate_digits, 0.3)}


# --------------------------------------------------------------------------------------------
# Speakers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speaker:
    """An espeak voice+variant with its own base speaking rate, pitch and intonation range."""

    name: str
    rate: float  # words per minute
    pitch: float  # espeak pitch parameter 0..100
    pitch_range: float  # espeak range parameter 0..100


def _make_speaker(name: str, seed: int) -> Speaker:
    # crc32, not hash(): hash() of a str is salted per process.
    rng = np.random.default_rng([seed, 0x5BEA, zlib.crc32(name.encode())])
    return Speaker(
        name,
        rate=float(rng.uniform(145, 195)),
        pitch=float(rng.uniform(30, 70)),
        pitch_range=float(rng.uniform(30, 85)),
    )


def _split_speakers(names: list[str], sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Assign disjoint speaker sets to the splits, roughly in proportion to their sizes."""
    order = list(np.random.default_rng([seed, 0x59EA]).permutation(sorted(names)))
    total = sum(sizes.values())
    out: dict[str, list[str]] = {}
    # Held-out splits first so they are never starved; train takes the rest.
    needed = sum(1 for s in SPLITS if sizes[s] > 0)
    if len(order) < needed:
        raise RuntimeError(f"only {len(order)} espeak speakers available, need {needed}")
    start = 0
    for split in ("val", "test"):
        if sizes[split] == 0:
            out[split] = []
            continue
        k = max(1, round(len(order) * sizes[split] / total))
        k = min(k, sizes[split], len(order) - start - (1 if sizes["train"] else 0))
        out[split] = [str(s) for s in order[start : start + k]]
        start += k
    out["train"] = [str(s) for s in order[start:]] if sizes["train"] else []
    return out


# --------------------------------------------------------------------------------------------
# Audio rendering (runs in worker processes)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    split: str
    index: int
    utt_id: str
    text: str
    speaker: Speaker
    seed: int
    min_duration: float = MIN_DURATION
    bandwidth_hz: float | None = None


def _trim_silence(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Cut leading/trailing near-silence (10 ms frames 45 dB below the loudest), keep 20 ms."""
    frame = sample_rate // 100
    n = len(audio) // frame
    if n == 0:
        return audio
    energy = (audio[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
    active = np.nonzero(energy > energy.max() * 10 ** (-45 / 10))[0]
    margin = 2 * frame
    start = max(0, active[0] * frame - margin)
    end = min(len(audio), (active[-1] + 1) * frame + margin)
    return audio[start:end]


def _coloured_noise(
    rng: np.random.Generator, n: int, exponent: float, sample_rate: int
) -> np.ndarray:
    """Unit-RMS noise with a 1/f^exponent power spectrum (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    spectrum *= np.maximum(freqs, 20.0) ** (-exponent / 2)
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _render(job: _Job, sample_rate: int, tts: EspeakSynthesizer) -> np.ndarray:
    """Synthesize and augment one utterance: float32 audio of job.min_duration..8 s."""
    rng = np.random.default_rng([job.seed, _SPLIT_CODE[job.split], job.index])
    # Draw every random quantity up front, in a fixed order, so retries cannot shift the stream.
    rate = job.speaker.rate * rng.uniform(0.9, 1.1)
    pitch = job.speaker.pitch + rng.uniform(-6, 6)
    pitch_range = job.speaker.pitch_range + rng.uniform(-10, 10)
    speed = rng.uniform(0.9, 1.1) if rng.random() < 0.3 else 1.0
    lead, trail = rng.uniform(0.05, 0.35, size=2)
    min_total = rng.uniform(job.min_duration + 0.02, 1.3)
    level_db = rng.uniform(-30, -16)  # speech RMS in dBFS
    snr_db = rng.uniform(15, 40)
    noise_exponent = rng.uniform(0, 2)
    noise_seed = int(rng.integers(2**31))
    espeak_seed = int(rng.integers(1, 2**31))

    max_speech = MAX_DURATION - 0.15
    for _ in range(6):
        raw, espeak_sr = tts.synthesize(
            job.text, job.speaker.name, rate, pitch, pitch_range, seed=espeak_seed
        )
        raw = _trim_silence(raw, espeak_sr)
        # Speed perturbation and resampling in one step: reading the samples as if they had been
        # recorded at espeak_sr * speed changes tempo and pitch together, like a tape.
        speech = soxr.resample(raw, espeak_sr * speed, sample_rate, quality="HQ").astype(np.float32)
        seconds = len(speech) / sample_rate
        if seconds <= max_speech:
            break
        if rate >= RATE_MAX:
            raise RuntimeError(f"{job.utt_id}: {job.text!r} is too long even at the fastest rate")
        # Too long for the speaker's pace: speak this sentence faster rather than drop it.
        rate = min(RATE_MAX, rate * seconds / (max_speech - 0.3))
    else:
        raise RuntimeError(f"{job.utt_id}: could not fit {job.text!r} into {MAX_DURATION} s")

    seconds = len(speech) / sample_rate
    # Pads: shrink them if the total would exceed the limit, grow them to reach the minimum.
    pads = np.array([lead, trail])
    room = MAX_DURATION - 0.02 - seconds
    if pads.sum() > room:
        pads *= room / pads.sum()
    if seconds + pads.sum() < min_total:
        pads *= (min_total - seconds) / max(pads.sum(), 1e-6)
    n_lead, n_trail = (int(p * sample_rate) for p in pads)

    speech_rms = np.sqrt(np.mean(speech**2)) + 1e-9
    speech = speech * (10 ** (level_db / 20) / speech_rms)
    audio = np.concatenate(
        [np.zeros(n_lead, np.float32), speech, np.zeros(n_trail, np.float32)]
    ).astype(np.float64)
    noise_rms = 10 ** ((level_db - snr_db) / 20)
    audio += noise_rms * _coloured_noise(
        np.random.default_rng(noise_seed), len(audio), noise_exponent, sample_rate
    )
    if job.bandwidth_hz is not None:
        # As if recorded at 2 x bandwidth (8 kHz telephone-band audio for 4 kHz) and played
        # back at the corpus rate: nothing above the band, like the real recordings it joins.
        narrow = soxr.resample(audio, sample_rate, 2 * job.bandwidth_hz, quality="HQ")
        wide = soxr.resample(narrow, 2 * job.bandwidth_hz, sample_rate, quality="HQ")
        audio = np.pad(wide, (0, max(0, len(audio) - len(wide))))[: len(audio)]
    peak = np.abs(audio).max()
    if peak > 0.98:  # loud draws: scale everything down, which keeps the SNR
        audio *= 0.98 / peak
    return audio.astype(np.float32)


def _render_chunk(out_dir: str, sample_rate: int, jobs: list[_Job]) -> list[dict[str, Any]]:
    """Worker entry point: render, write and describe a chunk of utterances."""
    tts = EspeakSynthesizer()
    rows = []
    for job in jobs:
        audio = _render(job, sample_rate, tts)
        rel = f"wav/{job.split}/{job.utt_id}.wav"
        path = os.path.join(out_dir, rel)
        sf.write(path, audio, sample_rate, subtype="PCM_16")
        info = sf.info(path)
        rows.append(
            {
                "split": job.split,
                "index": job.index,
                "audio_filepath": rel,
                "duration": round(info.frames / info.samplerate, 4),
                "text": job.text,
                "speaker": job.speaker.name,
            }
        )
    return rows


def _render_chunk_star(args: tuple[str, int, list[_Job]]) -> list[dict[str, Any]]:
    return _render_chunk(*args)


def _pool_context() -> mp.context.BaseContext:
    """A start method whose children do not inherit this process's espeak state.

    forkserver forks each worker from a clean server process (cheap, and the preloaded modules
    are already imported); spawn is the portable fallback. Plain fork would copy whatever the
    parent synthesised before, breaking reproducibility.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # Takes effect only if the server is not running yet; harmless otherwise.
        ctx.set_forkserver_preload(["asrkd.data.corpus"])
        return ctx
    return mp.get_context("spawn")


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def _config(
    seed: int, sizes: dict[str, int], sample_rate: int, kind: str, bandwidth_hz: float | None
) -> dict[str, Any]:
    config = {
        "version": CORPUS_VERSION,
        "seed": seed,
        "n_train": sizes["train"],
        "n_val": sizes["val"],
        "n_test": sizes["test"],
        "sample_rate": sample_rate,
    }
    # Only when set, so that default corpora built before these options existed are reused.
    if kind != "sentences":
        config["kind"] = kind
    if bandwidth_hz is not None:
        config["bandwidth_hz"] = bandwidth_hz
    return config


def _existing_stats(out: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The stats of a finished build with the same config, else None."""
    try:
        stats = json.loads((out / "stats.json").read_text())
    except (OSError, ValueError):
        return None
    if stats.get("config") != config:
        return None
    if not all((out / f"{split}.jsonl").is_file() for split in SPLITS):
        return None
    return stats


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _split_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    durations = [r["duration"] for r in rows]
    words = [w for r in rows for w in r["text"].split()]
    speakers = sorted({r["speaker"] for r in rows})
    return {
        "utterances": len(rows),
        "hours": round(sum(durations) / 3600, 4),
        "min_duration": min(durations, default=0.0),
        "max_duration": max(durations, default=0.0),
        "mean_duration": round(float(np.mean(durations)), 3) if durations else 0.0,
        "words": len(words),
        "vocabulary_size": len(set(words)),
        "num_speakers": len(speakers),
        "speakers": speakers,
    }


def _coverage(train: list[dict[str, Any]], held_out: list[dict[str, Any]]) -> dict[str, Any]:
    """How well training covers a held-out split's words (what its WER can measure)."""
    counts: dict[str, int] = {}
    for row in train:
        for word in row["text"].split():
            counts[word] = counts.get(word, 0) + 1
    words = [w for r in held_out for w in r["text"].split()]
    train_texts = {r["text"] for r in train}
    if not words:
        return {}
    return {
        "oov_rate": round(sum(counts.get(w, 0) == 0 for w in words) / len(words), 4),
        "rare_word_rate": round(sum(counts.get(w, 0) <= 5 for w in words) / len(words), 4),
        "sentences_in_train": sum(r["text"] in train_texts for r in held_out),
    }


def build_corpus(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    n_train: int = 3000,
    n_val: int = 300,
    n_test: int = 300,
    sample_rate: int = 16000,
    workers: int = 2,
    progress: bool = True,
    force: bool = False,
    kind: str = "sentences",
    bandwidth_hz: float | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the synthetic default corpus in ``out_dir`` and return its stats.

    Args:
        out_dir: output folder (created). Only ``wav/``, the three manifests and ``stats.json``
            inside it are written or deleted.
        seed: everything (texts, speaker split, audio) is a deterministic function of it.
        n_train, n_val, n_test: utterances per split. Sentences and speakers are disjoint
            across splits.
        sample_rate: output rate in Hz (espeak's 22.05 kHz is resampled with soxr).
        workers: worker processes for rendering (at least one; the output does not depend on it).
        progress: show a rich progress bar and a summary.
        force: rebuild even if a finished corpus with the same config exists.
        kind: ``"sentences"`` (the default corpus: distinct sentences of 1-8 s) or
            ``"digits"`` (single digit words, files from 0.3 s; see :data:`KINDS`).
        bandwidth_hz: band-limit the audio (noise included) to this many Hz, e.g. 4000 to
            match 8 kHz recordings; ``None`` keeps the full band.

    Returns:
        The content of ``stats.json``: ``config``, per-split ``splits[name]`` (utterances, hours,
        speakers, vocabulary size, ...), overall ``vocabulary_size``, ``num_speakers`` and
        ``build_seconds``.
    """
    sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    if min(sizes.values()) < 0 or sum(sizes.values()) == 0:
        raise UserError(f"bad split sizes {sizes}")
    out = Path(out_dir)
    if kind not in KINDS:
        raise UserError(f"unknown corpus kind {kind!r}; choose from {sorted(KINDS)}")
    if bandwidth_hz is not None and not 0 < bandwidth_hz < sample_rate / 2:
        raise UserError(f"bandwidth_hz must be in (0, {sample_rate / 2}), got {bandwidth_hz}")
    config = _config(seed, sizes, sample_rate, kind, bandwidth_hz)
    if not force:
        stats = _existing_stats(out, config)
        if stats is not None:
            if progress:
                _print_summary(stats, out, reused=True)
            return stats

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # Invalidate first: from here until stats.json is written again, the folder is "unfinished".
    for name in ["stats.json", *(f"{s}.jsonl" for s in SPLITS)]:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "wav", ignore_errors=True)
    for split in SPLITS:
        (out / "wav" / split).mkdir(parents=True)

    make_texts, min_duration = KINDS[kind]
    texts = make_texts(sum(sizes.values()), seed)
    speaker_names = EspeakSynthesizer().list_voices()
    split_speakers = _split_speakers(speaker_names, sizes, seed)

    jobs: list[_Job] = []
    offset = 0
    for split in SPLITS:
        split_texts = texts[offset : offset + sizes[split]]
        offset += sizes[split]
        # Balanced assignment: cycle through a shuffled speaker list of this split.
        spk_rng = np.random.default_rng([seed, 0x5A55, _SPLIT_CODE[split]])
        names = [split_speakers[split][i] for i in spk_rng.permutation(len(split_speakers[split]))]
        for i, text in enumerate(split_texts):
            jobs.append(
                _Job(
                    split,
                    i,
                    f"{split}_{i:06d}",
                    text,
                    _make_speaker(names[i % len(names)], seed),
                    seed,
                    min_duration,
                    bandwidth_hz,
                )
            )

    chunks = [(str(out), sample_rate, jobs[i : i + _CHUNK]) for i in range(0, len(jobs), _CHUNK)]
    rows: list[dict[str, Any]] = []
    ctx = _pool_context()
    # maxtasksperchild=1: every chunk gets a fresh process, hence fresh espeak state.
    with ctx.Pool(processes=max(1, min(workers, len(chunks))), maxtasksperchild=1) as pool:
        results = pool.imap_unordered(_render_chunk_star, chunks)
        if progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = (
                TextColumn("[bold]synthesising corpus"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            with Progress(*columns) as bar:
                task = bar.add_task("corpus", total=len(jobs))
                for chunk_rows in results:
                    rows.extend(chunk_rows)
                    bar.advance(task, len(chunk_rows))
        else:
            for chunk_rows in results:
                rows.extend(chunk_rows)

    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for row in sorted(rows, key=lambda r: (_SPLIT_CODE[r["split"]], r["index"])):
        by_split[row["split"]].append(
            {k: row[k] for k in ("audio_filepath", "duration", "text", "speaker")}
        )
    for split in SPLITS:
        lines = "".join(json.dumps(r) + "\n" for r in by_split[split])
        _write_atomic(out / f"{split}.jsonl", lines)

    all_words = {w for r in rows for w in r["text"].split()}
    split_stats = {s: _split_stats(by_split[s]) for s in SPLITS}
    for split in ("val", "test"):
        split_stats[split].update(_coverage(by_split["train"], by_split[split]))
    stats = {
        "config": config,
        "splits": split_stats,
        "hours": round(sum(r["duration"] for r in rows) / 3600, 4),
        "num_speakers": len({r["speaker"] for r in rows}),
        "vocabulary_size": len(all_words),
        "speaker_pool": {s: len(split_speakers[s]) for s in SPLITS},
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    _write_atomic(out / "stats.json", json.dumps(stats, indent=2) + "\n")  # last: marks done
    if progress:
        _print_summary(stats, out, reused=False)
    return stats


def _print_summary(stats: dict[str, Any], out: Path, reused: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    verb = "reused" if reused else f"built in {stats.get('build_seconds', '?')} s"
    table = Table(title=f"default corpus {out} ({verb})")
    for column in ("split", "utterances", "hours", "speakers", "vocabulary"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for split in SPLITS:
        s = stats["splits"][split]
        table.add_row(
            split,
            str(s["utterances"]),
            f"{s['hours']:.2f}",
            str(s["num_speakers"]),
            str(s["vocabulary_size"]),
        )
    table.add_row(
        "all",
        str(sum(stats["splits"][s]["utterances"] for s in SPLITS)),
        f"{stats['hours']:.2f}",
        str(stats["num_speakers"]),
        str(stats["vocabulary_size"]),
    )
    Console().print(table)
