"""Offline teacher cache: round trip, equality with online CTC KD, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from asrkd.cli import build_parser
from asrkd.data.dataset import ManifestDataset
from asrkd.data.tokenizer import CharTokenizer
from asrkd.losses import CTCFrameKD
from asrkd.models.common import pad_sequences
from asrkd.models.e2e_asr import build_model, save_checkpoint
from asrkd.training.teacher_cache import (
    CACHE_FORMAT,
    CachedCTCFrameKD,
    TeacherCache,
    TeacherCacheKeyError,
    cache_teacher,
    utterance_key,
)
from test_e2e import tiny_config


@pytest.fixture(scope="module")
def teacher_and_student():
    torch.manual_seed(0)
    tokenizer = CharTokenizer.english()
    teacher = build_model(tiny_config("none"), tokenizer).eval()
    torch.manual_seed(1)
    student = build_model(tiny_config("none"), tokenizer).eval()
    return teacher, student


@pytest.fixture(scope="module")
def small_manifest(tiny_corpus, tmp_path_factory):
    """Three lines of the val manifest (absolute paths): a teacher pass costs seconds."""
    lines = []
    for line in (tiny_corpus / "val.jsonl").read_text().splitlines()[:3]:
        record = json.loads(line)
        record["audio_filepath"] = str(tiny_corpus / record["audio_filepath"])
        lines.append(json.dumps(record))
    path = tmp_path_factory.mktemp("small") / "small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _batch(manifest, rows):
    """Waveforms (B, S), lengths (B,) and cache keys of manifest lines ``rows``."""
    dataset = ManifestDataset(manifest)
    items = [dataset[i] for i in rows]
    audio, lengths = pad_sequences([item["audio"] for item in items])
    keys = [utterance_key(dataset.entries[i]) for i in rows]
    return audio, lengths, keys


def test_cache_round_trip(tmp_path, tiny_corpus, teacher_and_student):
    teacher, _ = teacher_and_student
    manifest = tiny_corpus / "val.jsonl"
    stats = cache_teacher(teacher, manifest, tmp_path / "t.pt", top_k=5, batch_seconds=4.0)
    assert stats["utterances"] == 6 and stats["frames"] > 0 and stats["mb"] > 0
    assert not (tmp_path / "t.pt.tmp").exists()

    payload = torch.load(tmp_path / "t.pt", weights_only=True)  # plain containers only
    assert payload["format"] == CACHE_FORMAT
    assert payload["vocab_size"] == teacher.vocab_size
    assert payload["subsampling_factor"] == teacher.subsampling_factor
    assert payload["top_k"] == 5 and payload["temperature"] == 1.0
    assert payload["indices"].dtype == torch.int16 and payload["values"].dtype == torch.float32

    cache = TeacherCache(tmp_path / "t.pt")
    assert len(cache) == 6
    # Each utterance alone (no padding) gives what the batched cache holds.
    audio, lengths, keys = _batch(manifest, [0, 3])
    for row, key in enumerate(keys):
        with torch.no_grad():
            out = teacher(audio[row : row + 1, : lengths[row]], lengths[row : row + 1])
        expected = torch.log_softmax(out.ctc_logits[0], dim=-1).topk(5, dim=-1)
        values, indices = cache.utterance(key)
        assert values.shape == (int(out.encoder_lengths[0]), 5)
        torch.testing.assert_close(values, expected.values, atol=1e-4, rtol=1e-4)
        assert torch.equal(indices, expected.indices)

    frames = int(lengths.max()) // 8 + 4
    values, indices, cached_lengths = cache.batch(keys, frames, vocab_size=cache.vocab_size)
    assert values.shape == indices.shape == (2, frames, 5)
    assert values[0, cached_lengths[0] :].abs().sum() == 0  # zero padding


def test_cached_kd_equals_online_kd_when_k_is_vocab(tmp_path, small_manifest, teacher_and_student):
    teacher, student = teacher_and_student
    manifest = small_manifest
    vocab = teacher.vocab_size
    cache_teacher(teacher, manifest, tmp_path / "full.pt", top_k=vocab, batch_seconds=3.0)
    cache = TeacherCache(tmp_path / "full.pt")
    assert cache.top_k == vocab
    audio, lengths, keys = _batch(manifest, [0, 1, 2])
    with torch.no_grad():
        teacher_out = teacher(audio, lengths)
    student_out = student(audio, lengths)
    values, indices, cached_lengths = cache.batch(
        keys, student_out.ctc_logits.shape[1], student.vocab_size
    )
    assert torch.equal(cached_lengths, student_out.encoder_lengths)
    for tau, blank_weight, delay in [(1.0, 1.0, 0), (2.0, 1.0, 0), (3.0, 0.3, 0), (2.0, 1.0, 3)]:
        online = CTCFrameKD(temperature=tau, blank_weight=blank_weight, delay=delay)(
            student_out.ctc_logits, teacher_out.ctc_logits, student_out.encoder_lengths
        )
        cached = CachedCTCFrameKD(temperature=tau, blank_weight=blank_weight, delay=delay)(
            student_out.ctc_logits,
            values,
            indices,
            student_out.encoder_lengths,
            teacher_lengths=cached_lengths,
        )
        torch.testing.assert_close(cached, online, atol=1e-5, rtol=1e-6)  # float32 frame sums
    cached.backward()  # gradients reach the student
    assert next(student.ctc.parameters()).grad is not None
    student.zero_grad()


def test_cached_kd_with_small_k_is_close_and_finite(teacher_and_student):
    teacher, student = teacher_and_student
    torch.manual_seed(0)
    lengths = torch.tensor([7, 4])
    # A peaked teacher (as a trained one is): most mass sits in its top few tokens.
    teacher_logits = 8.0 * torch.randn(2, 7, teacher.vocab_size)
    teacher_logits[1, 4:] = float("nan")  # padding garbage never matters
    student_logits = torch.randn(2, 7, teacher.vocab_size, requires_grad=True)
    log_probs = torch.log_softmax(teacher_logits, dim=-1)
    online = CTCFrameKD(temperature=1.0)(student_logits, teacher_logits, lengths)
    for k in (4, 16):
        top = log_probs.topk(k, dim=-1)
        cached = CachedCTCFrameKD(temperature=1.0)(student_logits, top.values, top.indices, lengths)
        assert torch.isfinite(cached) and cached.item() >= 0
        assert abs(cached.item() - online.item()) < 0.1 * online.item()
        (grad,) = torch.autograd.grad(cached, student_logits)
        assert torch.isfinite(grad).all() and grad[1, 4:].abs().sum() == 0


def test_temperature_of_the_stored_values_does_not_matter(
    tmp_path, small_manifest, teacher_and_student
):
    teacher, student = teacher_and_student
    manifest = small_manifest
    cache_teacher(teacher, manifest, tmp_path / "t1.pt", top_k=6, batch_seconds=60.0)
    cache_teacher(teacher, manifest, tmp_path / "t3.pt", top_k=6, temperature=3.0)
    audio, lengths, keys = _batch(manifest, [0, 2])
    with torch.no_grad():
        logits = student(audio, lengths).ctc_logits
    loss = CachedCTCFrameKD(temperature=2.0)
    results = []
    for name in ("t1.pt", "t3.pt"):
        values, indices, cached = TeacherCache(tmp_path / name).batch(
            keys, logits.shape[1], student.vocab_size
        )
        results.append(loss(logits, values, indices, cached))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-6)


def test_missing_utterance_and_stale_cache_errors(
    tmp_path, tiny_corpus, small_manifest, teacher_and_student
):
    teacher, student = teacher_and_student
    cache_teacher(teacher, small_manifest, tmp_path / "t.pt", top_k=3)
    cache = TeacherCache(tmp_path / "t.pt")
    missing = utterance_key(tiny_corpus / "wav" / "test" / "test_000000.wav")
    with pytest.raises(KeyError) as info:
        cache.batch([cache.keys[0], missing], num_frames=500, vocab_size=student.vocab_size)
    assert isinstance(info.value, TeacherCacheKeyError)
    message = str(info.value)
    assert missing in message and str(tmp_path / "t.pt") in message
    assert "asrkd cache-teacher" in message
    with pytest.raises(ValueError, match="vocabulary size"):
        cache.batch(cache.keys[:1], num_frames=500, vocab_size=student.vocab_size + 1)
    with pytest.raises(ValueError, match="cached teacher frames"):
        cache.batch(cache.keys[:1], num_frames=1, vocab_size=student.vocab_size)
    values, indices, lengths = cache.batch(cache.keys[:2], 500, student.vocab_size)
    with pytest.raises(ValueError, match="rebuild it"):
        CachedCTCFrameKD()(
            torch.randn(2, 500, student.vocab_size),
            values,
            indices,
            lengths + 1,
            teacher_lengths=lengths,
        )
    cache.check_compatible(student)
    with pytest.raises(FileNotFoundError, match="asrkd cache-teacher"):
        TeacherCache(tmp_path / "absent.pt")


def test_validation_audio_outside_the_cache_gets_the_asr_loss(
    tmp_path, tiny_corpus, small_manifest, teacher_and_student
):
    """A cache written over the training set: validation batches (not in it) are scored by the
    student's ASR loss; a training batch that is not in the cache is still an error."""
    from asrkd.losses import ASRLoss
    from asrkd.training.distillation import KDConfig, build_kd

    teacher, student = teacher_and_student
    cache_teacher(teacher, small_manifest, tmp_path / "t.pt", top_k=3)
    wrapper = build_kd(student, ASRLoss(), KDConfig(losses=("ctc_kl",)),
                       teacher_cache=TeacherCache(tmp_path / "t.pt"))
    tokenizer = student.tokenizer
    audio, lengths, keys = _batch(small_manifest, [0, 1])
    targets = torch.tensor([tokenizer.encode("ab"), tokenizer.encode("cd")])
    target_lengths = torch.tensor([2, 2])
    other = utterance_key(tiny_corpus / "wav" / "test" / "test_000000.wav")
    wrapper.eval()
    with torch.no_grad():
        cached = wrapper(audio, lengths, targets, target_lengths, keys)
        outside = wrapper(audio, lengths, targets, target_lengths, [keys[0], other])
    assert "kd" in cached and cached["total"] != cached["asr"]
    assert "kd" not in outside and torch.equal(outside["total"], outside["asr"])
    torch.testing.assert_close(outside["asr"], cached["asr"])
    wrapper.train()
    with pytest.raises(TeacherCacheKeyError):
        wrapper(audio, lengths, targets, target_lengths, [keys[0], other])
    student.eval()


def test_cli_writes_the_cache(tmp_path, small_manifest, teacher_and_student, capsys):
    teacher, _ = teacher_and_student
    ckpt = save_checkpoint(teacher, tmp_path / "teacher.ckpt")
    parser = build_parser()
    args = parser.parse_args(
        [
            "cache-teacher",
            "--ckpt",
            str(ckpt),
            "--manifest",
            str(small_manifest),
            "--out",
            str(tmp_path / "c.pt"),
            "--top-k",
            "4",
            "--threads",
            "1",
            "--speed-factors",
            "0.9",
            "1.0",
        ]
    )
    args.func(args)
    stats = json.loads(capsys.readouterr().out)
    assert stats["utterances"] == 6
    cache = TeacherCache(tmp_path / "c.pt")
    assert cache.top_k == 4 and cache.teacher_checkpoint == str(ckpt.resolve())
    assert cache.speed_factors == (0.9, 1.0)


def test_speed_perturbed_training_finds_the_teacher_outputs_of_its_own_audio(
    tmp_path, small_manifest, teacher_and_student
):
    """With data.speed_factors the cache holds each speed copy under the key the training set
    gives it, so the student's perturbed audio gets the teacher's outputs for that audio."""
    from asrkd.data.dataset import speed_key

    teacher, student = teacher_and_student
    stats = cache_teacher(teacher, small_manifest, tmp_path / "s.pt", top_k=teacher.vocab_size,
                          speed_factors=(1.1, 0.9, 1.0, 0.9))
    assert stats["utterances"] == 9 and stats["speed_factors"] == [0.9, 1.0, 1.1]
    cache = TeacherCache(tmp_path / "s.pt")
    assert cache.speed_factors == (0.9, 1.0, 1.1) and len(cache) == 9
    base = utterance_key(ManifestDataset(small_manifest).entries[0])
    assert speed_key(base, 1.0) == base in cache
    assert speed_key(base, 0.9) == f"{base}#speed=0.9" in cache

    dataset = ManifestDataset(small_manifest, speed_factors=(0.9, 1.1), seed=3)
    seen = set()
    for epoch in range(6):
        item = dataset[0, epoch]
        seen.add(item["key"])
        assert item["key"] in cache
        with torch.no_grad():
            teacher_out = teacher(item["audio"][None], torch.tensor([len(item["audio"])]))
            student_out = student(item["audio"][None], torch.tensor([len(item["audio"])]))
        values, indices, lengths = cache.batch([item["key"]], student_out.ctc_logits.shape[1],
                                               student.vocab_size)
        assert torch.equal(lengths, student_out.encoder_lengths)
        online = CTCFrameKD(temperature=2.0)(student_out.ctc_logits, teacher_out.ctc_logits,
                                             student_out.encoder_lengths)
        cached = CachedCTCFrameKD(temperature=2.0)(student_out.ctc_logits, values, indices,
                                                   student_out.encoder_lengths, lengths)
        torch.testing.assert_close(cached, online, atol=1e-4, rtol=1e-5)
    assert seen == {speed_key(base, 0.9), speed_key(base, 1.1)}  # both copies were drawn


def test_a_cache_without_the_training_speed_factors_is_refused_before_training(
    tmp_path, small_manifest, teacher_and_student
):
    from asrkd.errors import UserError
    from asrkd.training.builder import build_objective
    from asrkd.training.distillation import KDConfig
    from asrkd.training.pipeline import TrainingConfig

    teacher, student = teacher_and_student
    cache_teacher(teacher, small_manifest, tmp_path / "plain.pt", top_k=3)
    cache = TeacherCache(tmp_path / "plain.pt")
    assert cache.speed_factors == (1.0,)
    cache.check_speed_factors(())
    cache.check_speed_factors((1.0,))
    training = TrainingConfig(use_kd=True, kd=KDConfig(losses=("ctc_kl",)))
    with pytest.raises(UserError, match=r"--speed-factors 0\.9 1 1\.1"):
        build_objective(student, training, teacher_cache=str(tmp_path / "plain.pt"),
                        speed_factors=(0.9, 1.0, 1.1))
    build_objective(student, training, teacher_cache=str(tmp_path / "plain.pt"))
    with pytest.raises(UserError, match="positive"):
        cache_teacher(teacher, small_manifest, tmp_path / "bad.pt", speed_factors=(0.0,))


def test_recipe_rebuilds_its_cache_when_the_speed_factors_change(
    tmp_path, small_manifest, teacher_and_student
):
    from asrkd.recipe import _teacher_cache

    teacher, _ = teacher_and_student
    save_checkpoint(teacher, tmp_path / "exp" / "teacher" / "model.ckpt")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text(small_manifest.read_text())
    path, _ = _teacher_cache(tmp_path / "exp", corpus)
    assert TeacherCache(path).speed_factors == (1.0,)
    written = path.stat().st_mtime_ns
    assert _teacher_cache(tmp_path / "exp", corpus, ())[0].stat().st_mtime_ns == written
    _teacher_cache(tmp_path / "exp", corpus, (0.9, 1.0, 1.1))
    assert TeacherCache(path).speed_factors == (0.9, 1.0, 1.1) and len(TeacherCache(path)) == 9


def test_a_cache_with_edge_noise_is_refused_before_training(tmp_path):
    from asrkd.errors import ConfigError
    from asrkd.training.pipeline import load_run_config, train

    config = load_run_config([], [f"output_dir={tmp_path / 'run'}",
                                  f"training.teacher_cache={tmp_path / 'missing.pt'}",
                                  "data.edge_noise_seconds=0.3"])
    with pytest.raises(ConfigError, match="edge_noise_seconds and data.concat_prob change"):
        train(config)
