"""A small ctypes wrapper around the libespeak-ng bundled by the ``espeakng-loader`` wheel.

espeak-ng is a formant synthesiser: robotic, but fully offline, tiny, very fast (hundreds of times
faster than real time on one core) and it ships many English accents and voice "variants". That
makes it a good source for the project's default corpus (:mod:`asrkd.data.corpus`).

espeak-ng keeps *all* of its state in process-global C variables (the selected voice, the
parameters, and inside the wave generator things like the pitch-flutter phase, the AGC level and
its noise generator). Consequences, handled here:

* One synthesiser per process. :class:`EspeakSynthesizer` objects are thin handles onto a single
  per-process engine, initialised lazily and re-initialised when a forked child first uses it.
  A lock serialises calls from threads.
* Randomness: espeak seeds its noise generator (breath, aspiration, Klatt voices) from the
  clock at initialisation, and the "klatt 6" voices use libc ``rand()``. ``synthesize(...,
  seed=n)`` reseeds both before speaking, otherwise the output is not reproducible at all.
* Even seeded, the waveform of an utterance depends on what the process synthesised before it
  (the wave generator's pitch-flutter phase, AGC level etc. carry over). The *same sequence* of
  seeded calls in a *fresh* process is bit-identical, so callers that need reproducible audio
  must synthesise in fresh processes (the corpus builder runs each fixed chunk of utterances in
  a new worker process).
* ``espeak_SetVoiceByName`` returns an error code for an unknown voice and keeps the previous
  voice, and it silently ignores an unknown ``+variant`` suffix. Both are checked here and raise
  :class:`VoiceNotFoundError` instead of quietly producing the wrong speaker.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass

import numpy as np

from asrkd.errors import UserError

__all__ = [
    "EspeakError",
    "EspeakSynthesizer",
    "VoiceNotFoundError",
    "DEFAULT_ENGLISH_VOICES",
    "DEFAULT_VARIANTS",
]

# --- Constants from espeak-ng's speak_lib.h (stable public ABI). ---
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: synth in the calling thread, then return
_POS_CHARACTER = 1  # espeak_POSITION_TYPE
_CHARS_UTF8 = 1  # espeak_Synth flags
_EE_OK = 0
_EE_INTERNAL_ERROR = -1
_EE_BUFFER_FULL = 1
_EE_NOT_FOUND = 2
_ERROR_NAMES = {
    _EE_INTERNAL_ERROR: "EE_INTERNAL_ERROR",
    _EE_BUFFER_FULL: "EE_BUFFER_FULL",
    _EE_NOT_FOUND: "EE_NOT_FOUND",
}
# espeak_PARAMETER
_PARAM_RATE = 1  # words per minute, 80..450
_PARAM_VOLUME = 2  # 0..200, 100 = normal
_PARAM_PITCH = 3  # 0..100, 50 = the voice's own base pitch
_PARAM_RANGE = 4  # 0..100, pitch range (0 = monotone)

RATE_MIN, RATE_MAX = 80, 450

# English voices (file names under espeak-ng-data/lang/gmw) that read Latin text as English.
# "en-shaw" is left out on purpose: it is for the Shavian alphabet and reads Latin text exactly
# like "en". Note that "en-gb" is a *language* tag, not a voice name: the British voice is "en".
DEFAULT_ENGLISH_VOICES: tuple[str, ...] = (
    "en",  # Great Britain
    "en-us",
    "en-us-nyc",
    "en-029",  # Caribbean
    "en-gb-scotland",
    "en-gb-x-rp",  # Received Pronunciation
    "en-gb-x-gbclan",  # Lancaster
    "en-gb-x-gbcwmd",  # West Midlands
)

# Voice variants (files under espeak-ng-data/voices/!v) that sound like a plausible human talker.
# Left out: whispers, croak, robot/echo effects (robosoft*, UniRobot, anikaRobot, RicishayMax*,
# Demonic, Tweaky, announcer), the bare klatt test voices, caleb (voicing 0), "fast" (a test
# voice), "Mr serious" (a space in its name) and zac (pitch of a small child).
DEFAULT_VARIANTS: tuple[str, ...] = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "f1", "f2", "f3", "f4", "f5",
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis", "Gene", "Jacky", "Lee", "Mario",
    "Michael", "Mike", "adam", "anika", "aunty", "belinda", "benjamin", "boris", "david", "ed",
    "edward", "grandma", "grandpa", "gustave", "ian", "john", "kaukovalta", "linda", "marcelo",
    "max", "michel", "norbert", "paul", "quincy", "rob", "robert", "shelby", "steph", "travis",
    "victor",
)  # fmt: skip


class EspeakError(RuntimeError):
    """An espeak-ng call failed (the message names the call and its error code)."""


class VoiceNotFoundError(EspeakError, UserError):
    """The requested voice or variant is not available in this espeak-ng installation."""


class _EspeakVoice(ctypes.Structure):
    """``espeak_VOICE`` from speak_lib.h (only read here, never written by espeak for us)."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        # (priority byte, NUL-terminated language) pairs, ended by a zero priority byte; kept as
        # a raw pointer because c_char_p would stop at the first byte.
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


# int callback(short *wav, int numsamples, espeak_EVENT *events); return 0 to continue.
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


@dataclass(frozen=True)
class VoiceInfo:
    """One espeak voice file: ``identifier`` is the name ``SetVoiceByName`` accepts."""

    identifier: str
    name: str
    languages: tuple[str, ...]
    gender: str  # "male", "female" or "unknown"


def _parse_languages(ptr: int | None) -> tuple[str, ...]:
    """Decode espeak's packed (priority, language) list into language tags."""
    out: list[str] = []
    if not ptr:
        return ()
    offset = 0
    while ctypes.c_ubyte.from_address(ptr + offset).value != 0:
        lang = ctypes.string_at(ptr + offset + 1)
        out.append(lang.decode("utf-8", "replace"))
        offset += 2 + len(lang)  # priority byte + text + NUL
    return tuple(out)


class _Engine:
    """The per-process espeak-ng state. Use :func:`_engine`, never construct directly."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise EspeakError("speech synthesis needs the 'espeakng-loader' package") from e
        self.pid = os.getpid()
        self.lock = threading.Lock()
        lib_path = espeakng_loader.get_library_path()
        self.data_path = espeakng_loader.get_data_path()
        try:
            self.lib = ctypes.CDLL(lib_path)
        except OSError as e:
            raise EspeakError(f"cannot load libespeak-ng from {lib_path}: {e}") from e
        self._declare_signatures()
        sample_rate = self.lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), 0
        )
        if sample_rate <= 0:
            raise EspeakError(
                f"espeak_Initialize failed (returned {sample_rate}); data path {self.data_path}"
            )
        self.sample_rate = int(sample_rate)
        self._chunks: list[np.ndarray] = []
        # Keep a reference to the ctypes callback: if it were garbage collected, espeak would
        # call freed memory.
        self._callback = _SYNTH_CALLBACK(self._on_audio)
        self.lib.espeak_SetSynthCallback(self._callback)
        self.current_voice: str | None = None
        self._voices: list[VoiceInfo] | None = None
        self._variants: list[VoiceInfo] | None = None

    def _declare_signatures(self) -> None:
        lib = self.lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,  # text
            ctypes.c_size_t,  # size (bytes, incl. NUL)
            ctypes.c_uint,  # position
            ctypes.c_int,  # position type
            ctypes.c_uint,  # end position (0 = none)
            ctypes.c_uint,  # flags
            ctypes.c_void_p,  # unique identifier out (may be NULL)
            ctypes.c_void_p,  # user data
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_EspeakVoice)]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_EspeakVoice))
        # espeak-ng >= 1.52 exports this; older builds cannot be seeded (checked at use).
        self.set_rand_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self.set_rand_seed is not None:
            self.set_rand_seed.argtypes = [ctypes.c_long]
            self.set_rand_seed.restype = ctypes.c_int
        # libc's rand() is used by the speechPlayer ("klatt 6") voices. CDLL(None) is the
        # already-loaded C library on Linux and macOS.
        try:
            self.libc_srand = ctypes.CDLL(None).srand
            self.libc_srand.argtypes = [ctypes.c_uint]
            self.libc_srand.restype = None
        except (OSError, AttributeError):  # pragma: no cover - exotic platforms
            self.libc_srand = None

    def _on_audio(self, wav, numsamples, events) -> int:  # noqa: ANN001 - ctypes callback
        # A NULL buffer marks the end of synthesis; otherwise copy out of espeak's buffer, which
        # it reuses for the next block.
        if wav and numsamples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        return 0

    @staticmethod
    def check(call: str, code: int) -> None:
        if code != _EE_OK:
            raise EspeakError(f"{call} failed with {_ERROR_NAMES.get(code, code)}")

    def list_voice_files(self, variants: bool) -> list[VoiceInfo]:
        """Voices (``variants=False``) or variants (``True``) espeak finds in its data folder."""
        cached = self._variants if variants else self._voices
        if cached is not None:
            return cached
        if variants:
            # A spec whose language is "variant" selects exactly the !v/ files; ListVoices(NULL)
            # omits them.
            spec = _EspeakVoice()
            lang = ctypes.create_string_buffer(b"variant")
            spec.languages = ctypes.cast(lang, ctypes.c_void_p)
            result = self.lib.espeak_ListVoices(ctypes.byref(spec))
        else:
            result = self.lib.espeak_ListVoices(None)
        infos: list[VoiceInfo] = []
        i = 0
        while result and result[i]:
            v = result[i].contents
            ident = (v.identifier or b"").decode("utf-8", "replace")
            infos.append(
                VoiceInfo(
                    identifier=ident.rsplit("/", 1)[-1],  # "gmw/en-US" -> "en-US", "!v/m3" -> "m3"
                    name=(v.name or b"").decode("utf-8", "replace"),
                    languages=_parse_languages(v.languages),
                    gender={1: "male", 2: "female"}.get(v.gender, "unknown"),
                )
            )
            i += 1
        if variants:
            self._variants = infos
        else:
            self._voices = infos
        return infos

    def set_voice(self, voice: str) -> None:
        """Select ``base`` or ``base+variant``; raise :class:`VoiceNotFoundError` if missing."""
        if voice == self.current_voice:
            return
        base, _, variant = voice.partition("+")
        if variant:
            # espeak accepts "en-us+nonexistent" with EE_OK and just drops the variant, so check
            # the variant against the files it really has (the lookup is case-sensitive).
            known = {v.identifier for v in self.list_voice_files(variants=True)}
            if variant not in known:
                raise VoiceNotFoundError(
                    f"espeak-ng has no voice variant {variant!r} (asked for {voice!r}); "
                    f"see EspeakSynthesizer().list_variants()"
                )
        code = self.lib.espeak_SetVoiceByName(voice.encode("utf-8"))
        if code != _EE_OK:
            # The previous voice stays selected after a failure: forget it so that a retry of
            # the old name really re-selects it.
            self.current_voice = None
            hint = ""
            if base == "en-gb":
                hint = " ('en-gb' is a language tag; the British voice is 'en')"
            raise VoiceNotFoundError(
                f"espeak_SetVoiceByName({voice!r}) failed with "
                f"{_ERROR_NAMES.get(code, code)}: no such voice{hint}"
            )
        self.current_voice = voice

    def seed(self, seed: int) -> None:
        if self.set_rand_seed is None:
            raise EspeakError("this libespeak-ng has no espeak_ng_SetRandSeed; cannot seed it")
        self.check("espeak_ng_SetRandSeed", self.set_rand_seed(seed))
        if self.libc_srand is not None:
            self.libc_srand(seed & 0xFFFFFFFF)

    def synth(self, text: str) -> np.ndarray:
        data = text.encode("utf-8") + b"\0"
        self._chunks = []
        code = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self.check("espeak_Synth", code)
        chunks, self._chunks = self._chunks, []
        if not chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(chunks)


_ENGINE: _Engine | None = None
_ENGINE_LOCK = threading.Lock()


def _engine() -> _Engine:
    """This process's engine, created on first use (and again in a forked child)."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None or _ENGINE.pid != os.getpid():
            # A forked child inherits the parent's half-used espeak state and ctypes objects;
            # initialising again gives it its own clean engine.
            _ENGINE = _Engine()
        return _ENGINE


class EspeakSynthesizer:
    """Text to speech with espeak-ng.

    All instances in a process share one engine (espeak-ng is process-global); creating one is
    cheap. Safe to use from several threads (calls are serialised) and from worker processes
    (each process initialises its own engine on first use).

    Example::

        tts = EspeakSynthesizer()
        audio, sr = tts.synthesize("hello world", voice="en-us+f3", rate=170, pitch=55)
    """

    def __init__(self, english_voices: tuple[str, ...] = DEFAULT_ENGLISH_VOICES) -> None:
        self.english_voices = english_voices

    @property
    def sample_rate(self) -> int:
        """espeak's native output rate (22050 Hz for the bundled build)."""
        return _engine().sample_rate

    def list_variants(self) -> list[str]:
        """All variant names installed (the part after ``+`` in a voice name), sorted."""
        eng = _engine()
        with eng.lock:
            return sorted(v.identifier for v in eng.list_voice_files(variants=True))

    def list_voices(self, variants: tuple[str, ...] | None = DEFAULT_VARIANTS) -> list[str]:
        """The usable English speakers, as ``voice+variant`` names, sorted.

        Args:
            variants: variant names to combine with each English voice (default: the curated,
                human-sounding :data:`DEFAULT_VARIANTS`); ``None`` lists the bare voices only.

        Only names that really load are returned: every voice is selected once and checked.
        """
        eng = _engine()
        with eng.lock:
            installed_variants = {v.identifier for v in eng.list_voice_files(variants=True)}
            bases = []
            for voice in self.english_voices:
                try:
                    eng.set_voice(voice)
                except VoiceNotFoundError:
                    continue  # an older/newer espeak build without this accent
                bases.append(voice)
        if variants is None:
            return sorted(bases)
        usable = [v for v in variants if v in installed_variants]
        return sorted(f"{b}+{v}" for b in bases for v in usable)

    def synthesize(
        self,
        text: str,
        voice: str = "en-us",
        rate: int = 175,
        pitch: int = 50,
        pitch_range: int = 50,
        seed: int | None = None,
    ) -> tuple[np.ndarray, int]:
        """Speak ``text`` with ``voice`` (``"en-us"``, ``"en-gb-x-rp+f3"``, ...).

        Args:
            text: plain text (no SSML).
            voice: an espeak voice name, optionally ``+variant``.
            rate: speaking rate in words per minute, clipped to 80..450.
            pitch: 0..100, 50 is the voice's own base pitch.
            pitch_range: 0..100 intonation range, 50 is the voice's own.
            seed: reseed espeak's noise generators first (needed for reproducible audio, see
                the module docstring); ``None`` keeps the clock-seeded state.

        Returns:
            ``(audio, sample_rate)``: mono float32 in [-1, 1] of shape ``(T,)`` and espeak's rate.

        Raises:
            VoiceNotFoundError: the voice or variant does not exist.
            EspeakError: any other espeak-ng failure.
        """
        eng = _engine()
        with eng.lock:
            eng.set_voice(voice)
            params = (
                (_PARAM_RATE, int(np.clip(round(rate), RATE_MIN, RATE_MAX))),
                (_PARAM_PITCH, int(np.clip(round(pitch), 0, 100))),
                (_PARAM_RANGE, int(np.clip(round(pitch_range), 0, 100))),
                (_PARAM_VOLUME, 100),
            )
            for param, value in params:
                eng.check("espeak_SetParameter", eng.lib.espeak_SetParameter(param, value, 0))
            if seed is not None:
                eng.seed(seed)
            samples = eng.synth(text)
            sample_rate = eng.sample_rate
        return samples.astype(np.float32) / 32768.0, sample_rate
