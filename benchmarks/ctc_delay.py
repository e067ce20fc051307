"""How many encoder frames later a student's CTC spikes come than its teacher's.

For ``kd.ctc_delay`` (docs/streaming.md): a streaming student sees less of the future than a
full-context teacher and emits later. On every utterance of the manifest where the two greedy
transcripts have the same tokens, each token's first frame in the student is compared with its
first frame in the teacher. Prints the median, mean and 10th-90th percentiles of the offsets.

Usage: python benchmarks/ctc_delay.py --teacher exp/an4/teacher/model.ckpt \\
           --student exp/an4_streaming/streaming_no_kd/student/model.ckpt \\
           --manifest exp/an4/manifests/val.jsonl
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from asrkd.data.dataset import ManifestDataset
from asrkd.models.e2e_asr import E2EASR, load_checkpoint


def spikes(model: E2EASR, audio: torch.Tensor) -> list[tuple[int, int]]:
    """(first frame, token) of every token the CTC greedy path emits."""
    with torch.no_grad():
        out = model.encode(audio[None], torch.tensor([audio.numel()]))
        path = model.ctc.log_probs(out.output)[0].argmax(-1).tolist()
    emitted, previous = [], -1
    for frame, token in enumerate(path):
        if token != previous and token != model.tokenizer.blank_id:
            emitted.append((frame, token))
        previous = token
    return emitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher, student = load_checkpoint(args.teacher), load_checkpoint(args.student)
    if teacher.subsampling_factor != student.subsampling_factor:
        raise SystemExit("teacher and student frame rates differ")
    dataset = ManifestDataset(args.manifest)
    offsets, used = [], 0
    for index in range(len(dataset)):
        audio = torch.as_tensor(dataset[index]["audio"]).float()
        s, t = spikes(student, audio), spikes(teacher, audio)
        if s and [token for _, token in s] == [token for _, token in t]:
            used += 1
            offsets += [fs - ft for (fs, _), (ft, _) in zip(s, t)]
    if not offsets:
        raise SystemExit("no utterance where both transcripts agree")
    values = np.asarray(offsets)
    print(json.dumps({
        "utterances": used, "of": len(dataset), "tokens": int(values.size),
        "median": float(np.median(values)), "mean": round(float(values.mean()), 2),
        "p10": float(np.percentile(values, 10)), "p90": float(np.percentile(values, 90)),
    }))


if __name__ == "__main__":
    main()
