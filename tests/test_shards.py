"""Tar shards: written from a manifest, read back the same; the epoch plan; DDP and workers;
mid-epoch resume; Lhotse CutSet input; the sharded teacher cache."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asrkd.data.audio_processing import load_audio
from asrkd.data.datamodule import DurationBatchSampler
from asrkd.data.dataset import (
    ManifestDataset,
    ManifestError,
    collate_batch,
    read_manifest,
    utterance_key,
)
from asrkd.data.shards import (
    BatchingConfig,
    Shard,
    ShardDataset,
    ShardError,
    ShardLoader,
    iter_shard,
    plan_epoch,
    read_index,
    shard_keys,
    shard_texts,
    write_shards,
)
from asrkd.data.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]


def _keys_of(dataset: ShardDataset) -> list[list[str]]:
    return [batch["keys"] for batch in ShardLoader(dataset, progress=None)]


@pytest.fixture(scope="module")
def shards(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(tiny_corpus / "train.jsonl", out, shard_seconds=4.0)
    return out


def test_shards_read_back_the_manifests_audio_text_and_keys(tiny_corpus, shards):
    dataset = ManifestDataset(tiny_corpus / "train.jsonl")
    by_key = {utterance_key(e): i for i, e in enumerate(dataset.entries)}
    seen = []
    for shard in read_index(shards):
        for _, meta, data, name in iter_shard(shard.path):
            item = dataset[by_key[meta["key"]]]
            from asrkd.data.audio_processing import decode_audio

            assert np.array_equal(decode_audio(data, name), item["audio"].numpy())
            assert meta["text"] == item["text"]
            seen.append(meta["key"])
    assert sorted(seen) == sorted(by_key)
    assert len(read_index(shards)) > 4  # 4 s shards
    assert sorted(shard_texts(shards)) == sorted(e.text for e in dataset.entries)


def test_shard_batches_equal_the_manifest_batches_of_the_same_utterances(tiny_corpus, shards):
    """What the model is trained on from shards is tensor for tensor what the manifest dataset
    gives for the same utterances (docs/scale.md: the shard reader is not what trains worse)."""
    tokenizer = CharTokenizer.english()
    dataset = ManifestDataset(tiny_corpus / "train.jsonl", tokenizer=tokenizer)
    by_key = {utterance_key(e): i for i, e in enumerate(dataset.entries)}
    reader = ShardDataset(shards, tokenizer, BatchingConfig(max_batch_seconds=6.0),
                          rank=0, world_size=1)
    batches = list(ShardLoader(reader, progress=None))
    assert len(batches) > 2
    for batch in batches:
        expected = collate_batch([dataset[by_key[key]] for key in batch["keys"]])
        for name in ("audio", "audio_lengths", "targets", "target_lengths"):
            assert torch.equal(batch[name], expected[name]), name
        assert batch["texts"] == expected["texts"]


def test_shards_are_byte_identical_for_the_same_manifest(tiny_corpus, tmp_path):
    for name in ("a", "b"):
        write_shards(tiny_corpus / "train.jsonl", tmp_path / name, shard_seconds=8.0)
    for path in sorted((tmp_path / "a").iterdir()):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name


def test_segments_with_an_offset_are_cut_into_the_shard(tmp_path, tiny_corpus):
    source = ManifestDataset(tiny_corpus / "train.jsonl").entries[0]
    manifest = tmp_path / "segments.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": str(source.audio_filepath),
                                    "offset": 0.25, "duration": 0.5, "text": "a b"}) + "\n")
    write_shards(manifest, tmp_path / "shards")
    (shard,) = read_index(tmp_path / "shards")
    ((_, meta, data, name),) = list(iter_shard(shard.path))
    from asrkd.data.audio_processing import decode_audio

    expected = load_audio(source.audio_filepath, offset=0.25, duration=0.5)
    assert np.array_equal(decode_audio(data, name), expected)
    assert meta["key"].endswith("@0.25")


def _fake_shards(counts: list[int], seed: int = 0) -> list[Shard]:
    rng = np.random.default_rng(seed)
    return [Shard(Path(f"s{i}.tar"), tuple(float(d) for d in rng.uniform(0.5, 6.0, n)))
            for i, n in enumerate(counts)]


@pytest.mark.parametrize("slots", [1, 2, 4, 6])
def test_epoch_plan_every_utterance_once_equal_batches_within_budget(slots):
    shards = _fake_shards([40, 55, 13, 70, 32, 41, 60, 8])
    config = BatchingConfig(max_batch_seconds=20.0, max_batch_size=6, buffer_size=16)
    assigned, batches = plan_epoch(shards, slots, epoch=3, seed=7, config=config)
    ids = [uid for slot in batches for batch in slot for uid in batch]
    everything = {(n, p) for n, s in enumerate(shards) for p in range(len(s.durations))}
    assert len(ids) == len(set(ids)) and set(ids) == everything
    assert len({len(slot) for slot in batches}) == 1  # every slot the same number of batches
    for slot, numbers in zip(batches, assigned):
        for batch in slot:
            assert {n for n, _ in batch} <= set(numbers)  # a slot reads only its own shards
            longest = max(shards[n].durations[p] for n, p in batch)
            assert longest * len(batch) <= 20.0 and len(batch) <= 6
    # A pure function of its arguments (every rank computes the same), new per epoch.
    assert plan_epoch(shards, slots, 3, 7, config) == (assigned, batches)
    assert plan_epoch(shards, slots, 4, 7, config)[1] != batches


def _windows(shards: list[Shard], numbers: list[int], size: int) -> dict[tuple[int, int], int]:
    """Which batching window each utterance of a slot reading shards ``numbers`` falls in."""
    stream = [(n, p) for n in numbers for p in range(len(shards[n].durations))]
    return {uid: i // size for i, uid in enumerate(stream)}


def test_a_corpus_within_one_window_is_batched_as_from_its_manifest():
    # The same utterances in the same batches as the manifest sampler's (sorted chunks), only
    # the batch order differs: a model trained from shards sees what it would from files.
    shards = _fake_shards([40, 55, 13, 70])
    config = BatchingConfig(max_batch_seconds=20.0, max_batch_size=6, buffer_size=200)
    ids = [(n, p) for n, s in enumerate(shards) for p in range(len(s.durations))]
    sampler = DurationBatchSampler([shards[n].durations[p] for n, p in ids], 20.0, 6)
    from_files = {frozenset(ids[i] for i in batch) for batch in sampler}
    for epoch in range(2):
        batches = plan_epoch(shards, 1, epoch, 0, config)[1][0]
        assert {frozenset(batch) for batch in batches} == from_files
    # A smaller window: each of its batches from one window of the stream, sorted and cut.
    small = BatchingConfig(max_batch_seconds=20.0, max_batch_size=6, buffer_size=30)
    assigned, batches = plan_epoch(shards, 1, 0, 0, small)
    window_of = _windows(shards, assigned[0], 30)
    assert all(len({window_of[uid] for uid in batch}) == 1 for batch in batches[0])
    assert len(batches[0]) == len({frozenset(b) for b in batches[0]})


def test_epoch_plan_filters_durations_and_refuses_too_few_shards():
    shards = _fake_shards([10, 10])
    config = BatchingConfig(max_batch_seconds=20.0, min_duration=2.0, max_duration=5.0)
    _, batches = plan_epoch(shards, 1, 0, 0, config)
    kept = [shards[n].durations[p] for b in batches[0] for n, p in b]
    assert kept and all(2.0 <= d <= 5.0 for d in kept)
    with pytest.raises(ShardError, match="every reader"):
        plan_epoch(shards, 3, 0, 0, config)


def test_two_ranks_two_workers_see_every_utterance_once(shards):
    config = BatchingConfig(max_batch_seconds=6.0, buffer_size=4)
    tokenizer = CharTokenizer.english()
    keys, lengths = Counter(), []
    for rank in range(2):
        dataset = ShardDataset(shards, tokenizer, config, num_workers=2, rank=rank,
                               world_size=2)
        batches = _keys_of(dataset)
        assert len(batches) == len(dataset)
        lengths.append(len(batches))
        keys.update(key for batch in batches for key in batch)
    every = set(shard_keys(shards))
    assert set(keys) == every and max(keys.values()) == 1
    assert lengths[0] == lengths[1]


def test_resume_mid_epoch_yields_the_rest_of_the_epoch(shards):
    config = BatchingConfig(max_batch_seconds=6.0, buffer_size=4)
    tokenizer = CharTokenizer.english()

    def run(skip: int | None) -> list[list[str]]:
        dataset = ShardDataset(shards, tokenizer, config, num_workers=2, rank=0, world_size=1,
                               speed_factors=(0.9, 1.0, 1.1), seed=5)
        loader = ShardLoader(dataset, progress=lambda: (1, 0))
        if skip is not None:
            loader.load_state_dict({"epoch": 1, "batches_done": skip})
        return [batch["keys"] for batch in loader]

    whole = run(None)
    assert run(3) == whole[3:]
    assert run(len(whole))[0] != whole[0]  # checkpointed at the epoch's end: the next epoch
    # Speed factors are drawn per epoch and utterance: the same keys on a resumed run.
    assert any("#speed=" in key for batch in whole for key in batch)


def test_too_few_shards_for_workers_is_a_clear_error(tiny_corpus, tmp_path):
    write_shards(tiny_corpus / "train.jsonl", tmp_path / "one", shard_seconds=3600)
    dataset = ShardDataset(tmp_path / "one", None, num_workers=2, rank=0, world_size=1)
    with pytest.raises(ShardError, match="shard-seconds"):
        len(dataset)


def test_missing_index_and_shard_are_clear_errors(shards, tmp_path):
    with pytest.raises(ShardError, match="asrkd shard"):
        read_index(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "index.json").write_text((shards / "index.json").read_text())
    with pytest.raises(ShardError, match="missing"):
        read_index(copy)


# ---------------------------------------------------------------------------------------------
# Lhotse CutSet manifests (lines as lhotse 1.33's CutSet.to_file writes them)
# ---------------------------------------------------------------------------------------------


def _cut(wav: Path, start: float, duration: float, text: str | None, kind: str = "MonoCut",
         sources: list | None = None) -> dict:
    info = sf.info(str(wav))
    supervisions = [] if text is None else [{
        "id": "a-sup0", "recording_id": "a", "start": 0.0, "duration": duration, "channel": 0,
        "text": text, "language": "English", "speaker": "spk1"}]
    return {"id": f"a-{start}", "start": start, "duration": duration, "channel": 0,
            "supervisions": supervisions,
            "recording": {"id": "a", "sources": sources or [
                {"type": "file", "channels": [0], "source": wav.name}],
                "sampling_rate": info.samplerate, "num_samples": info.frames,
                "duration": info.frames / info.samplerate, "channel_ids": [0]},
            "type": kind}


def test_lhotse_cutset_is_read_as_the_manifest_it_stands_for(tmp_path, tiny_corpus):
    source = ManifestDataset(tiny_corpus / "train.jsonl").entries[0]
    wav = tmp_path / "a.wav"
    wav.write_bytes(source.audio_filepath.read_bytes())
    lines = [_cut(wav, 0.0, source.duration, "hello world"),
             _cut(wav, 0.2, 0.5, "hello"),
             _cut(wav, 0.0, 0.4, "he")]
    manifest = tmp_path / "cuts.jsonl.gz"
    manifest.write_bytes(gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode()))
    entries, _ = read_manifest(manifest)
    assert [(e.offset, e.duration, e.text, e.speaker) for e in entries] == [
        (0.0, source.duration, "hello world", "spk1"), (0.2, 0.5, "hello", "spk1"),
        (0.0, 0.4, "he", "spk1")]
    dataset = ManifestDataset(manifest)
    assert np.array_equal(dataset[0]["audio"].numpy(), load_audio(wav))
    assert np.array_equal(dataset[1]["audio"].numpy(), load_audio(wav, offset=0.2, duration=0.5))
    # A cut at the file's start shorter than it is a segment, not the whole file.
    assert len(dataset[2]["audio"]) == int(0.4 * 16000)
    assert len({item["key"] for item in (dataset[0], dataset[1], dataset[2])}) == 3
    # Shards from a CutSet read back the cut audio.
    write_shards(manifest, tmp_path / "shards", shuffle=False)
    (shard,) = read_index(tmp_path / "shards")
    from asrkd.data.audio_processing import decode_audio

    audio = [decode_audio(data, name) for _, _, data, name in iter_shard(shard.path)]
    assert [len(a) for a in audio] == [len(dataset[i]["audio"]) for i in range(3)]


def test_lhotse_cuts_asrkd_cannot_read_are_named(tmp_path, tiny_corpus):
    source = ManifestDataset(tiny_corpus / "train.jsonl").entries[0]
    wav = tmp_path / "a.wav"
    wav.write_bytes(source.audio_filepath.read_bytes())
    mixed = {"id": "m", "tracks": [], "type": "MixedCut"}
    url = _cut(wav, 0.0, 0.5, "x", sources=[{"type": "url", "channels": [0],
                                             "source": "https://example.com/a.wav"}])
    for line, message in ((mixed, "MixedCut"), (url, "'url'")):
        manifest = tmp_path / "cuts.jsonl"
        manifest.write_text(json.dumps(line) + "\n")
        with pytest.raises(ManifestError, match=message):
            read_manifest(manifest)


# ---------------------------------------------------------------------------------------------
# The sharded teacher cache
# ---------------------------------------------------------------------------------------------


def test_compressed_topk_round_trip_within_a_quantisation_step():
    from asrkd.training.teacher_shards import MIN_LOG_PROB, STEP, compress_topk, expand_topk

    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(50, 40) * 6, dim=-1)
    values, indices = log_probs.topk(8, dim=-1)
    back_values, back_indices = expand_topk(*compress_topk(values, indices, 40))
    relative = values - values[:, :1]
    counts = (relative >= MIN_LOG_PROB).sum(1)
    assert counts.min() < 8  # some frames keep fewer than k tokens
    assert back_values.shape == (50, int(counts.max()))
    for t, c in enumerate(counts.tolist()):
        assert torch.equal(back_indices[t, :c], indices[t, :c])
        assert (back_values[t, :c] - relative[t, :c]).abs().max() <= STEP / 2 + 1e-6
        assert torch.isinf(back_values[t, c:]).all()


@pytest.mark.slow
def test_sharded_teacher_cache_distils_like_the_one_file_cache(tmp_path, tiny_corpus, shards):
    from asrkd.data.dataset import collate_batch
    from asrkd.losses import ASRLoss
    from asrkd.models.e2e_asr import build_model, save_checkpoint
    from asrkd.training.distillation import KDConfig, build_kd
    from asrkd.training.teacher_cache import TeacherCache, cache_teacher
    from asrkd.training.teacher_shards import ShardedTeacherCache, cache_teacher_shards
    from test_e2e import tiny_config

    tokenizer = CharTokenizer.english()
    torch.manual_seed(1)
    teacher = save_checkpoint(build_model(tiny_config(), tokenizer), tmp_path / "teacher.ckpt")
    stats = cache_teacher_shards(teacher, shards, tmp_path / "tcache", top_k=8,
                                 speed_factors=(0.9, 1.0))
    assert stats["bytes_per_audio_hour"] > 0 and len(list((tmp_path / "tcache").glob("*.npz"))) \
        == len(read_index(shards))
    cache_teacher(teacher, tiny_corpus / "train.jsonl", tmp_path / "one.pt", top_k=8,
                  speed_factors=(0.9, 1.0))
    config = BatchingConfig(max_batch_seconds=6.0, buffer_size=4)
    sharded = ShardedTeacherCache(tmp_path / "tcache")
    dataset = ShardDataset(shards, tokenizer, config, rank=0, world_size=1,
                           speed_factors=(0.9, 1.0), teacher=sharded)
    batch = next(iter(ShardLoader(dataset, progress=None)))
    assert "teacher" in batch
    torch.manual_seed(3)
    student = build_model(tiny_config(), tokenizer)
    kd = KDConfig(losses=("ctc_kl",), temperature=2.0)
    from_shards = build_kd(student, ASRLoss(), kd, teacher_cache=sharded).eval()
    from_file = build_kd(student, ASRLoss(), kd, teacher_cache=TeacherCache(tmp_path / "one.pt"))
    from_file.eval()
    args = (batch["audio"], batch["audio_lengths"], batch["targets"], batch["target_lengths"])
    with torch.no_grad():
        a = from_shards(*args, batch["keys"], stored_teacher=batch["teacher"])["kd"]
        b = from_file(*args, batch["keys"])["kd"]
    # Quantised to 1/16 nat and pruned below -16 nats: the same loss to within 1 %.
    assert torch.isclose(a, b, rtol=1e-2), (a, b)
    assert collate_batch([None]) is None


def _check_each_utterance_once(shards: Path, out: Path) -> None:
    records = [json.loads((out / f"keys_rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in records)
    every = set(shard_keys(shards))
    seen = Counter(key.split("#speed=")[0] for r in records for b in r["keys"] for key in b)
    assert set(seen) == every and max(seen.values()) == 1
    assert len(records[0]["keys"]) == len(records[1]["keys"]) == records[0]["expected_batches"]


@pytest.mark.slow
def test_ddp_two_processes_two_workers_train_each_utterance_once_per_epoch(tmp_path,
                                                                         tiny_corpus):
    shards = tmp_path / "shards"
    write_shards(tiny_corpus / "train.jsonl", shards, shard_seconds=4.0)
    out = tmp_path / "run"
    out.mkdir()
    process = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_shards_child.py"), str(shards),
         str(tiny_corpus / "val.jsonl"), str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert process.returncode == 0, process.stderr[-3000:]
    _check_each_utterance_once(shards, out)


@pytest.mark.slow
def test_two_nodes_launched_by_torchrun_train_each_utterance_once(tmp_path, tiny_corpus):
    """The multi-node launch of docs/scale.md: one torchrun per node (here two single-process
    nodes on this machine, gloo over loopback), Lightning's trainer.num_nodes=2."""
    import socket

    shards = tmp_path / "shards"
    write_shards(tiny_corpus / "train.jsonl", shards, shard_seconds=4.0)
    out = tmp_path / "run"
    out.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    nodes = [subprocess.Popen(
        [str(torchrun), "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
         "--master-addr=127.0.0.1", f"--master-port={port}",
         str(ROOT / "tests" / "ddp_shards_child.py"), str(shards),
         str(tiny_corpus / "val.jsonl"), str(out), "2", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for rank in range(2)]
    outputs = [node.communicate(timeout=900) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][1][-3000:]
    _check_each_utterance_once(shards, out)


def test_shard_cli_writes_an_index(tmp_path, tiny_corpus):
    process = subprocess.run(
        [sys.executable, "-m", "asrkd.cli", "shard", "--manifest",
         str(tiny_corpus / "val.jsonl"), "--out", str(tmp_path / "s"), "--shard-seconds", "5"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert process.returncode == 0, process.stderr[-2000:]
    summary = json.loads(process.stdout)
    assert summary["utterances"] == 6 and summary["shards"] == len(read_index(tmp_path / "s"))
    with tarfile.open(tmp_path / "s" / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[0].endswith((".wav", ".flac")) and names[1].endswith(".json")


def test_markdown_sections_survive_a_rewrite_of_the_file(tmp_path):
    from asrkd.utils.markdown import carry_sections, update_section

    path = tmp_path / "BENCH.md"
    path.write_text("# Benchmarks\n\nold table\n")
    update_section(path, "data-loading", "## Data\n\nrow 1")
    update_section(path, "data-loading", "## Data\n\nrow 2")  # replaced, not repeated
    update_section(path, "gpu", "## GPU\n\nnone")
    text = path.read_text()
    assert text.count("## Data") == 1 and "row 2" in text and "row 1" not in text
    rewritten = carry_sections(text, "# Benchmarks\n\nnew table\n")
    assert "new table" in rewritten and "old table" not in rewritten
    assert rewritten.index("## Data") < rewritten.index("## GPU")


@pytest.mark.slow
def test_training_from_shards_reshuffles_every_epoch(tmp_path, tiny_corpus, shards,
                                                     monkeypatch):
    """Through Lightning: each epoch gets its own plan (the loader reads the epoch from the
    trainer), and each epoch trains on every utterance once."""
    import lightning as L

    import asrkd.training.pipeline as pipeline
    from asrkd.training.pipeline import load_run_config, train
    from resume_child import overrides

    seen: dict[int, list[str]] = {}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):  # noqa: ANN001
            seen.setdefault(trainer.current_epoch, []).extend(batch["keys"])

    build = pipeline.build_trainer
    monkeypatch.setattr(pipeline, "build_trainer",
                        lambda *a, **k: build(*a, **k, extra_callbacks=[Record()]))
    run = overrides(tiny_corpus, tmp_path / "run", steps=-1) + [
        f"data.train_shards={shards}", "trainer.max_epochs=2", "data.speed_factors=[]"]
    train(load_run_config(overrides=run))
    every = set(shard_keys(shards))
    assert set(seen) == {0, 1}
    for keys in seen.values():
        assert sorted(keys) == sorted(every)
    assert seen[0] != seen[1]


def test_concat_prob_is_refused_with_shards(tmp_path, tiny_corpus, shards):
    """Joining random utterances needs random access to the whole epoch: with shards it is
    refused by name, never silently ignored."""
    from asrkd.errors import ConfigError
    from asrkd.training.pipeline import load_run_config, train
    from resume_child import overrides

    run = overrides(tiny_corpus, tmp_path / "run", steps=1) + [
        f"data.train_shards={shards}", "data.concat_prob=0.5"]
    with pytest.raises(ConfigError, match=r"data\.concat_prob"):
        train(load_run_config(overrides=run))


def test_short_first_sorts_each_window_of_the_first_epoch():
    shards = _fake_shards([40, 55, 13, 70])
    config = BatchingConfig(max_batch_seconds=20.0, max_batch_size=6, buffer_size=50,
                            short_first=True)

    def longest(batches: list) -> list[float]:
        return [max(shards[n].durations[p] for n, p in batch) for batch in batches]

    assigned, batches = plan_epoch(shards, 1, 0, 0, config)
    window_of = _windows(shards, assigned[0], 50)
    windows = [window_of[batch[0]] for batch in batches[0]]
    assert windows == sorted(windows)  # windows in stream order, each ascending
    for w in set(windows):
        mine = [b for b, i in zip(batches[0], windows) if i == w]
        assert longest(mine) == sorted(longest(mine))
    later = longest(plan_epoch(shards, 1, 1, 0, config)[1][0])
    assert later != sorted(later)  # shuffled from the second epoch on
