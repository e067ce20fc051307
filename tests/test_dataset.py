"""Manifest validation, the dataset, collate, the duration-bucketed sampler, converters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asrkd.data.converters import folder_to_manifest, librispeech_to_manifest
from asrkd.data.datamodule import ASRDataModule, DurationBatchSampler
from asrkd.data.dataset import ManifestDataset, ManifestError, collate_batch, read_manifest
from asrkd.data.tokenizer import PAD_ID, CharTokenizer
from asrkd.utils.metrics import corpus_error_rates, word_errors


def _write_wavs(folder: Path, count: int, seconds: float = 0.5) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        path = folder / f"utt{i}.wav"
        length = int(16000 * seconds * (1 + i % 3))
        sf.write(path, 0.1 * rng.standard_normal(length).astype(np.float32), 16000)
        lines.append({"audio_filepath": f"wav/utt{i}.wav", "duration": length / 16000,
                      "text": f"hello number {i}"})
    return lines


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    lines = _write_wavs(tmp_path / "wav", 10)
    text = "\n".join(json.dumps(line) for line in lines)
    (tmp_path / "good.jsonl").write_text(text + "\n")
    return tmp_path


# Every other kind of bad line: tests/test_robustness.py (the table of docs/robustness.md).
def test_broken_line_seven_is_named_or_skipped(manifest_dir):
    lines = (manifest_dir / "good.jsonl").read_text().splitlines()
    lines[6] = lines[6][:-5]  # truncate the JSON object on line 7
    (manifest_dir / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"bad\.jsonl, line 7: broken JSON"):
        read_manifest(manifest_dir / "bad.jsonl")
    entries, report = read_manifest(manifest_dir / "bad.jsonl", strict=False)
    assert len(entries) == 9 and report.skipped["broken JSON"] == 1
    assert "line 7" in report.summary()


def test_unreadable_audio_and_duration_filters(manifest_dir):
    (manifest_dir / "wav" / "utt3.wav").write_bytes(b"not audio at all")
    with pytest.raises(ManifestError, match="line 4: cannot read"):
        read_manifest(manifest_dir / "good.jsonl")
    entries, report = read_manifest(
        manifest_dir / "good.jsonl", strict=False, min_duration=0.6, max_duration=1.2
    )
    assert report.skipped["unreadable audio"] == 1
    assert all(0.6 <= e.duration <= 1.2 for e in entries)
    assert report.filtered_short + report.filtered_long + len(entries) == 9


def test_dataset_and_collate_pad_with_lengths(manifest_dir):
    tokenizer = CharTokenizer.english()
    dataset = ManifestDataset(manifest_dir / "good.jsonl", tokenizer=tokenizer)
    batch = collate_batch([dataset[0], dataset[1]])
    assert batch["audio"].shape == (2, int(batch["audio_lengths"].max()))
    assert batch["audio_lengths"].tolist() == [8000, 16000]
    assert batch["audio"][0, 8000:].abs().sum() == 0
    assert tokenizer.decode(batch["targets"][0, : batch["target_lengths"][0]].tolist()) == (
        "hello number zero")
    assert (batch["targets"][0, batch["target_lengths"][0]:] == PAD_ID).all()


def test_duration_sampler_budget_and_ddp_split():
    rng = np.random.default_rng(0)
    durations = rng.uniform(1, 8, size=300).tolist()
    sampler = DurationBatchSampler(durations, max_batch_seconds=40, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(300))
    for batch in batches:
        assert len(batch) == 1 or max(durations[i] for i in batch) * len(batch) <= 40
    sampler.set_epoch(1)
    assert list(sampler) != batches  # reshuffled per epoch
    ranks = [list(DurationBatchSampler(durations, 40, seed=1, num_replicas=2, rank=r))
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    covered = {i for rank in ranks for b in rank for i in b}
    assert covered == set(range(300))


def test_short_first_curriculum_orders_only_the_first_epoch():
    durations = np.random.default_rng(0).uniform(1, 8, size=300).tolist()
    sampler = DurationBatchSampler(durations, max_batch_seconds=40, seed=1, short_first=True)
    first = list(sampler)
    longest = [max(durations[i] for i in b) for b in first]
    assert longest == sorted(longest)
    assert sorted(i for b in first for i in b) == list(range(300))
    sampler.set_epoch(1)
    later = [max(durations[i] for i in b) for b in sampler]
    assert later != sorted(later)  # shuffled again from the second epoch


def test_neighbouring_seeds_do_not_share_epochs():
    # Random(seed + epoch) gave seed 1's epoch e the order of seed 0's epoch e + 1.
    durations = np.random.default_rng(0).uniform(1, 8, size=300).tolist()
    zero, one = (DurationBatchSampler(durations, 40, seed=s) for s in (0, 1))
    for epoch in range(3):
        zero.set_epoch(epoch + 1)
        one.set_epoch(epoch)
        assert list(zero) != list(one)


def _epoch_batches_trained(callbacks: list) -> tuple[list[int], list[int], list[int]]:
    """(batches each epoch's sampler yields, batches Lightning trained in that epoch, batches
    of the epoch trained when its validation ran)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Counter(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.trained: list[int] = []
            self.validated_after: list[int] = []

        def on_train_epoch_start(self) -> None:
            self.trained.append(0)

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            self.trained[-1] += 1
            return self.layer(batch[0]).sum()

        def validation_step(self, batch, batch_idx) -> None:  # noqa: ANN001
            if batch_idx == 0:
                self.validated_after.append(self.trained[-1])

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.SGD(self.parameters(), lr=0.0)

    durations = np.random.default_rng(0).uniform(1, 8, size=200).tolist()
    sampler = DurationBatchSampler(durations, 20, seed=0, bucket_size=1, short_first=True)
    expected = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        expected.append(len(list(sampler)))
    assert len(set(expected)) > 1  # epochs of different lengths, or the test shows nothing
    sampler.set_epoch(0)
    loader = DataLoader(TensorDataset(torch.zeros(200, 1)), batch_sampler=sampler)
    module = Counter()
    # Validation once per epoch (Lightning's default val_check_interval=1.0).
    L.Trainer(max_epochs=4, callbacks=callbacks, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0).fit(module, loader, loader)
    return expected, module.trained, module.validated_after


def test_every_epoch_trains_all_its_batches():
    from asrkd.training.callbacks import EpochLength

    expected, trained, validated_after = _epoch_batches_trained([EpochLength()])
    assert trained == expected
    assert validated_after == expected  # at the end of each epoch, once
    # Without it Lightning keeps the first epoch's count for every epoch.
    expected, trained, _ = _epoch_batches_trained([])
    assert trained != expected


def test_a_resumed_runs_train_loader_starts_at_the_resumed_epoch(manifest_dir):
    # Lightning takes the epoch's length from the loader before it restores the loader's
    # state; sized as epoch 0, a longer resumed epoch would be cut short.
    from types import SimpleNamespace

    module = ASRDataModule(train_manifest=str(manifest_dir / "good.jsonl"), max_batch_seconds=3.0)
    module.attach_tokenizer(CharTokenizer.english())
    progress = SimpleNamespace(current=SimpleNamespace(processed=3))
    module.trainer = SimpleNamespace(fit_loop=SimpleNamespace(
        epoch_progress=progress, epoch_loop=SimpleNamespace(batch_progress=progress)))
    assert module.train_dataloader().batch_sampler.epoch == 3


def test_datamodule_batches(manifest_dir):
    module = ASRDataModule(
        train_manifest=str(manifest_dir / "good.jsonl"),
        val_manifest=str(manifest_dir / "good.jsonl"),
        max_batch_seconds=3.0,
    )
    module.attach_tokenizer(CharTokenizer.english())
    batches = list(module.train_dataloader())
    assert sum(len(b["texts"]) for b in batches) == 10
    assert all("targets" in b for b in batches)
    assert all(b["audio"].shape[1] * len(b["texts"]) <= 3.0 * 16000 or len(b["texts"]) == 1
               for b in batches)


def test_converters_on_real_speech(tmp_path, ljspeech_dir):
    lines = [json.loads(x) for x in (ljspeech_dir / "manifest.jsonl").read_text().splitlines()]
    # LibriSpeech layout: speaker/chapter/<spk>-<ch>-<n>.flac + .trans.txt
    chapter = tmp_path / "libri" / "19" / "198"
    chapter.mkdir(parents=True)
    trans = []
    for n, line in enumerate(lines[:3]):
        audio, rate = sf.read(ljspeech_dir / line["audio_filepath"])
        sf.write(chapter / f"19-198-{n:04d}.flac", audio, rate)
        trans.append(f"19-198-{n:04d} {line['text'].upper()}")
    (chapter / "19-198.trans.txt").write_text("\n".join(trans) + "\n")
    count = librispeech_to_manifest(tmp_path / "libri", tmp_path / "libri.jsonl")
    entries, _ = read_manifest(tmp_path / "libri.jsonl")
    assert count == len(entries) == 3
    assert entries[0].speaker == "19"
    assert abs(entries[0].duration - lines[0]["duration"]) < 1e-3

    # Folder with sidecar .txt files, and the same folder with one TSV.
    folder = tmp_path / "folder" / "LJ"
    folder.mkdir(parents=True)
    tsv = []
    for line in lines[:4]:
        source = ljspeech_dir / line["audio_filepath"]
        (folder / source.name).write_bytes(source.read_bytes())
        (folder / source.name).with_suffix(".txt").write_text(line["text"])
        tsv.append(f"{source.name}\t{line['text']}")
    (tmp_path / "t.tsv").write_text("\n".join(tsv))
    assert folder_to_manifest(tmp_path / "folder", tmp_path / "a.jsonl", speaker_from="parent") == 4
    assert folder_to_manifest(tmp_path / "folder", tmp_path / "b.jsonl", tmp_path / "t.tsv") == 4
    a, _ = read_manifest(tmp_path / "a.jsonl")
    b, _ = read_manifest(tmp_path / "b.jsonl")
    assert [e.text for e in a] == [e.text for e in b] == [x["text"] for x in lines[:4]]
    assert a[0].speaker == "LJ"
    assert len(ManifestDataset(tmp_path / "a.jsonl")[0]["audio"]) > 16000


def test_error_rates_match_jiwer():
    import jiwer

    refs = ["the cat sat on the mat", "hello world", "a b c d"]
    hyps = ["the cat sat on mat", "hello there world", "a x c d e"]
    ours = corpus_error_rates(refs, hyps)
    theirs = jiwer.process_words(refs, hyps)
    assert ours["wer"] == pytest.approx(theirs.wer)
    assert (ours["substitutions"], ours["deletions"], ours["insertions"]) == (
        theirs.substitutions, theirs.deletions, theirs.insertions)
    assert ours["cer"] == pytest.approx(jiwer.cer(refs, hyps))
    assert word_errors("", "").rate == 0.0 and word_errors("", "x").rate == 1.0
    assert torch.tensor(ours["wer"]).isfinite()


def test_edge_noise_pads_with_the_noise_floor_reproducibly(manifest_dir):
    import random

    from asrkd.data.dataset import add_edge_noise

    rng = np.random.default_rng(0)
    audio = np.concatenate([0.01 * rng.standard_normal(4000), rng.standard_normal(8000)]
                           ).astype(np.float32)
    padded = add_edge_noise(audio, 0.5, 16000, random.Random(3))
    again = add_edge_noise(audio, 0.5, 16000, random.Random(3))
    assert np.array_equal(padded, again)
    extra = len(padded) - len(audio)
    assert 0 < extra <= 16000
    start = next(k for k in range(extra + 1) if np.array_equal(padded[k:k + len(audio)], audio))
    noise = np.concatenate([padded[:start], padded[start + len(audio):]])
    assert 0.005 < noise.std() < 0.02  # the quiet part's level, not the loud part's
    assert np.array_equal(add_edge_noise(np.zeros(800, np.float32), 0.5, 16000,
                                         random.Random(1))[:10], np.zeros(10, np.float32))

    plain = ManifestDataset(manifest_dir / "good.jsonl", strict=False)
    noisy = ManifestDataset(manifest_dir / "good.jsonl", strict=False, edge_noise_seconds=0.3)
    first, second = noisy[(0, 1)], noisy[(0, 1)]
    assert torch.equal(first["audio"], second["audio"])  # (index, epoch) decides the draw
    assert 0 <= len(first["audio"]) - len(plain[0]["audio"]) <= 2 * 0.3 * 16000
    with pytest.raises(Exception, match="edge_noise_seconds must be >= 0"):
        ManifestDataset(manifest_dir / "good.jsonl", strict=False, edge_noise_seconds=-1)


def test_concat_joins_another_utterance_and_its_text(manifest_dir):
    tokenizer = CharTokenizer.english()
    plain = ManifestDataset(manifest_dir / "good.jsonl", tokenizer=tokenizer, strict=False)
    joined = ManifestDataset(manifest_dir / "good.jsonl", tokenizer=tokenizer, strict=False,
                             concat_prob=1.0)
    item = joined[(2, 0)]
    assert torch.equal(item["audio"], joined[(2, 0)]["audio"])  # (index, epoch) decides
    first, rest = item["text"].split(" ", 3)[:3], item["text"].split(" ", 3)[3:]
    assert " ".join(first) == "hello number 2" and rest and rest[0].startswith("hello number")
    assert rest[0] != "hello number 2"  # the partner is another utterance
    own = plain[2]["audio"]
    assert torch.equal(item["audio"][: len(own)], own)
    partner = plain[int(rest[0].split()[-1])]["audio"]
    gap = len(item["audio"]) - len(own) - len(partner)
    assert 0 <= gap <= 0.3 * 16000
    assert torch.equal(item["audio"][len(own) + gap:], partner)
    assert item["tokens"].tolist() == tokenizer.encode(item["text"])
    assert ManifestDataset(manifest_dir / "good.jsonl", strict=False,
                           concat_prob=0.0)[(2, 0)]["text"] == "hello number 2"
    with pytest.raises(Exception, match=r"concat_prob must be within \[0, 1\]"):
        ManifestDataset(manifest_dir / "good.jsonl", strict=False, concat_prob=1.5)
