"""Any recogniser as a sequence-level teacher (``asrkd.transcribers``).

The filtering and manifest plumbing run with a stub transcriber; the Hugging Face adapters run
on tiny random-weight models built and saved in the test (needs ``transformers``; skipped
without it). Real speech from ../shared/data (skipped when absent).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from asrkd.errors import UserError
from asrkd.training.pseudo_labels import pseudo_label
from asrkd.transcribers import Transcriber, Transcript, load_transcriber
from conftest import an4_test_manifest, read_jsonl


class StubTranscriber:
    """Returns the reference text of the utterance with the n-th longest audio, with set
    confidences: exercises everything but the recogniser."""

    name = "stub"
    sample_rate = 16000

    def __init__(self, answers: dict[int, Transcript]):
        self.answers = answers  # by sample count
        self.batches = 0

    def transcribe(self, audio):
        self.batches += 1
        return [self.answers[len(a)] for a in audio]


def test_pseudo_label_filters_any_transcriber(tmp_path, an4_dir):
    from asrkd.data.audio_processing import load_audio

    path, rows = an4_test_manifest(an4_dir, tmp_path, 4)
    lengths = [len(load_audio(an4_dir / r["audio_filepath"])) for r in rows]
    answers = {
        lengths[0]: Transcript(rows[0]["text"].upper() + ".", -0.1, 7),  # kept, normalised
        lengths[1]: Transcript("wrong words", -0.2, 2),  # kept, but wrong
        lengths[2]: Transcript(rows[2]["text"], -3.0, 4),  # low confidence
        lengths[3]: Transcript("", 0.0, 0),  # empty
    }
    stub = StubTranscriber(answers)
    assert isinstance(stub, Transcriber)
    report = pseudo_label(stub, path, tmp_path / "out.jsonl", min_confidence=-1.0,
                          agreement_with=None)
    assert report["method"] == "stub" and report["total"] == 4 and report["kept"] == 2
    assert report["dropped"] == {"empty transcript": 1, "low confidence": 1}
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["text"] for o in out] == [answers[lengths[0]].text, "wrong words"]
    assert out[0]["teacher_confidence"] == -0.1 and out[0]["original_text"] == rows[0]["text"]
    # References and external text are compared normalised: the first line is right.
    from asrkd.utils.metrics import corpus_error_rates

    expected = corpus_error_rates([rows[0]["text"], rows[1]["text"]],
                                  [rows[0]["text"], "wrong words"])["wer"]
    assert report["wer_kept"] == pytest.approx(expected, abs=1e-4) and expected > 0
    with pytest.raises(UserError, match="needs an asrkd teacher"):
        pseudo_label(stub, path, tmp_path / "x.jsonl", agreement_with="ctc_greedy")


def _tiny_wav2vec2(folder):
    transformers = pytest.importorskip("transformers")
    letters = "abcdefghijklmnopqrstuvwxyz'"
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate(letters)}}
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), unk_token="<unk>",
                                                  pad_token="<pad>", word_delimiter_token="|")
    extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
        return_attention_mask=True)
    transformers.Wav2Vec2Processor(feature_extractor=extractor,
                                   tokenizer=tokenizer).save_pretrained(folder)
    config = transformers.Wav2Vec2Config(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, conv_dim=(16, 16, 16), conv_stride=(5, 4, 4),
        conv_kernel=(10, 8, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        pad_token_id=0, feat_extract_norm="layer", do_stable_layer_norm=True)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(config)
    with torch.no_grad():  # favour letters and word breaks over blank, so text comes out
        model.lm_head.bias.normal_(0.0, 1.0)
        model.lm_head.bias[0] -= 1.0
    model.save_pretrained(folder)
    return transformers, folder


def test_hugging_face_ctc_teacher(tmp_path, an4_dir):
    transformers, folder = _tiny_wav2vec2(tmp_path / "w2v")
    path, rows = an4_test_manifest(an4_dir, tmp_path, 3)
    teacher = load_transcriber(f"hf-ctc:{folder}")
    report = pseudo_label(teacher, path, tmp_path / "out.jsonl", min_confidence=float("-inf"),
                          agreement_with=None)
    assert report["total"] == 3 and report["method"].startswith("wav2vec2")
    out = {o["audio_filepath"]: o for o in map(json.loads, (tmp_path / "out.jsonl")
                                                 .read_text().splitlines())}
    # Against transformers itself, one utterance at a time.
    from asrkd.data.audio_processing import load_audio

    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = transformers.AutoModelForCTC.from_pretrained(folder).eval()
    checked = 0
    for row in rows:
        audio = load_audio(an4_dir / row["audio_filepath"])
        inputs = processor(audio, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            log_probs = model(inputs.input_values).logits.log_softmax(-1)[0]
        ids = log_probs.argmax(-1)
        text = processor.decode(ids).strip()
        path_ids = ids.tolist()
        emitted = [t for i, t in enumerate(path_ids) if t != 0 and (i == 0 or t != path_ids[i - 1])]
        confidence = float(log_probs.max(-1).values.sum()) / max(len(emitted), 1)
        key = str(an4_dir / row["audio_filepath"])
        if not text:
            assert key not in out  # empty transcripts are dropped
            continue
        assert out[key]["text"] == text
        assert out[key]["teacher_confidence"] == pytest.approx(confidence, abs=2e-3)
        checked += 1
    assert checked >= 2
    with pytest.raises(UserError, match="no config.json"):
        load_transcriber(f"hf-ctc:{tmp_path / 'absent'}")


def test_cli_pseudo_label_with_a_hugging_face_teacher(tmp_path, an4_dir, capsys):
    from asrkd.cli import main

    _, folder = _tiny_wav2vec2(tmp_path / "w2v")
    path, _ = an4_test_manifest(an4_dir, tmp_path, 2)
    code = main(["pseudo-label", "--ckpt", f"hf-ctc:{folder}", "--manifest", str(path),
                 "--out", str(tmp_path / "o.jsonl"), "--min-confidence=-inf"])
    assert code == 0 and "of 2 utterances" in capsys.readouterr().out
    code = main(["pseudo-label", "--ckpt", f"hf-ctc:{folder}", "--manifest", str(path),
                 "--out", str(tmp_path / "o.jsonl"), "--agreement-with", "ctc_beam"])
    assert code == 2 and "needs an asrkd teacher" in capsys.readouterr().err


def test_transcript_scale_matches_asrkd_models():
    """ModelTranscriber gives pseudo_label the confidences it computed before."""
    from asrkd.data.tokenizer import CharTokenizer
    from asrkd.models.e2e_asr import build_model
    from asrkd.training.pseudo_labels import per_token_confidence
    from asrkd.transcribers import ModelTranscriber
    from test_e2e import tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config(), CharTokenizer.english()).eval()
    audio = [np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1]
    got = ModelTranscriber(model, "ctc_greedy").transcribe(audio)[0]
    hyp = model.infer(torch.from_numpy(audio[0])[None], torch.tensor([8000]),
                      method="ctc_greedy")[0]
    assert got.text == hyp.text and got.units == len(hyp.tokens)
    assert got.confidence == pytest.approx(per_token_confidence(hyp, "ctc_greedy"))


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table (Whisper's byte-level BPE alphabet), 256 symbols."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = [], 0
    for byte in range(256):
        if byte in printable:
            codes.append(byte)
        else:
            codes.append(256 + extra)
            extra += 1
    order = printable + [b for b in range(256) if b not in printable]
    table = dict(zip(order, [chr(c) for c in printable] + [chr(256 + i) for i in
                                                          range(256 - len(printable))]))
    return [table[b] for b in range(256)]


def _tiny_whisper(folder, an4_dir):
    """A 1-layer d16 Whisper with a byte-level vocabulary (no merges), fitted for 60 steps on
    two AN4 utterances so that greedy generation says something."""
    transformers = pytest.importorskip("transformers")
    from asrkd.data.audio_processing import load_audio

    folder.mkdir()
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                "<|notimestamps|>"]
    for special in specials:
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    eot, sot, no_ts = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"], vocab[
        "<|notimestamps|>"]
    tokenizer = transformers.WhisperTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<|endoftext|>",
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    processor = transformers.WhisperProcessor(
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=80),
        tokenizer=tokenizer)
    processor.save_pretrained(folder)
    config = transformers.WhisperConfig(
        vocab_size=len(vocab), num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=256,
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot)
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config)
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, max_length=64,
        no_timestamps_token_id=no_ts)
    rows = read_jsonl(an4_dir / "manifest_test.jsonl")[:2]
    waves = [load_audio(an4_dir / row["audio_filepath"]) for row in rows]
    features = processor(waves, sampling_rate=16000, return_tensors="pt").input_features
    labels = [[sot, no_ts] + tokenizer.encode(row["text"], add_special_tokens=False) + [eot]
              for row in rows]
    width = max(map(len, labels))
    targets = torch.full((len(labels), width), -100)
    for i, label in enumerate(labels):
        targets[i, : len(label)] = torch.tensor(label)
    inputs = targets.clamp(min=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        logits = model(input_features=features, decoder_input_ids=inputs[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    return transformers, folder, waves


@pytest.mark.slow
def test_hugging_face_seq2seq_teacher(tmp_path, an4_dir):
    transformers, folder, waves = _tiny_whisper(tmp_path / "whisper", an4_dir)
    teacher = load_transcriber(f"hf-seq2seq:{folder}")
    assert teacher.sample_rate == 16000 and teacher.name.startswith("whisper")
    got = teacher.transcribe(waves)
    # Against transformers itself, one utterance at a time.
    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(folder).eval()
    for wave, transcript in zip(waves, got):
        features = processor(wave, sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            out = model.generate(features, do_sample=False, num_beams=1, max_new_tokens=128,
                                 output_scores=True, return_dict_in_generate=True)
            logp = model.compute_transition_scores(out.sequences, out.scores,
                                                   normalize_logits=True)[0]
        new = out.sequences[0, -logp.shape[0]:].tolist()
        end = new.index(model.generation_config.eos_token_id) + 1 if (
            model.generation_config.eos_token_id in new) else len(new)
        text = processor.batch_decode([new[:end]], skip_special_tokens=True)[0].strip()
        assert transcript.text == text and text  # the fitted model says something
        # The adapter decodes both utterances in one batch: float32 rounding differs slightly.
        assert transcript.confidence == pytest.approx(float(logp[:end].mean()), abs=1e-2)
        assert transcript.units == end - (new[end - 1] == model.generation_config.eos_token_id)
