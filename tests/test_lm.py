"""Token n-gram LM: a proper distribution, Kneser-Ney behaviour, fusion in CTC beam search."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from asrkd.data.tokenizer import CharTokenizer
from asrkd.decoding.ctc import ctc_prefix_beam_search
from asrkd.models.lm import LMFusion, NGramLM, train_lm

TEXTS = ["the cat sat", "the cat ran", "a dog sat", "the dog ran far", "a cat sat down"]


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.english()


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_every_context_is_a_distribution(tokenizer, order):
    """For seen, unseen and sentence-start contexts, P(. | context) sums to 1 over the tokens
    that can follow (every id but <s>)."""
    lm = train_lm(TEXTS, tokenizer, order=order)
    ids = [i for i in range(tokenizer.vocab_size) if i != tokenizer.bos_id]
    contexts = [lm.initial_state()]
    for text in ["the c", "a do", "zzq", "t"]:
        state = lm.initial_state()
        for token in tokenizer.encode(text):
            state = lm.advance(state, token)
        contexts.append(state)
    for state in contexts:
        total = sum(math.exp(lm.log_prob(state, token)) for token in ids)
        assert total == pytest.approx(1.0, abs=1e-9), (order, state)


def test_kneser_ney_prefers_what_it_has_seen(tokenizer):
    lm = train_lm(TEXTS, tokenizer, order=4)
    assert lm.sentence_log_prob(tokenizer.encode("the cat sat")) > lm.sentence_log_prob(
        tokenizer.encode("the tac sat")
    )
    # held-out text of the same kind: far below the uniform model's perplexity (V - 1 = 32)
    held_out = [tokenizer.encode(t) for t in ["the dog sat", "a cat ran"]]
    assert lm.perplexity(held_out) < 6.0
    # a token never seen in training still has a non-zero probability
    assert math.isfinite(lm.log_prob(lm.initial_state(), tokenizer.encode("z")[0]))


def test_save_load_round_trip(tmp_path, tokenizer):
    lm = train_lm(TEXTS, tokenizer, order=3)
    lm.fusion = {"weight": 0.7, "length_bonus": 1.5}
    lm.save(tmp_path / "lm.json")
    again = NGramLM.load(tmp_path / "lm.json")
    for text in ["the cat sat", "dog far", "qq"]:
        tokens = tokenizer.encode(text)
        assert again.sentence_log_prob(tokens) == pytest.approx(lm.sentence_log_prob(tokens),
                                                                abs=1e-4)
    fusion = again.fusion_settings()
    assert (fusion.weight, fusion.length_bonus) == (0.7, 1.5)
    assert again.fusion_settings(weight=0.2).weight == 0.2
    again.check_tokenizer(tokenizer)
    with pytest.raises(ValueError, match="another tokenizer"):
        again.check_tokenizer(CharTokenizer(list("abc ")))
    with pytest.raises(FileNotFoundError, match="asrkd lm"):
        NGramLM.load(tmp_path / "absent.json")


def _ambiguous_posteriors(tokenizer, frames_per_char=3):
    """CTC log-probs where 'c' and 'k' are equally likely at the first letter of "cat"."""
    text = "cat"
    vocab = tokenizer.vocab_size
    rows = []
    for ch in text:
        for f in range(frames_per_char):
            row = torch.full((vocab,), -8.0)
            if f == 1:
                if ch == "c":
                    row[tokenizer.encode("c")[0]] = math.log(0.45)
                    row[tokenizer.encode("k")[0]] = math.log(0.46)
                else:
                    row[tokenizer.encode(ch)[0]] = math.log(0.9)
                row[tokenizer.blank_id] = math.log(0.09)
            else:
                row[tokenizer.blank_id] = 0.0
            rows.append(row)
    return torch.log_softmax(torch.stack(rows), dim=-1)[None], torch.tensor([len(rows)])


def test_fusion_changes_the_decision_towards_the_lm(tokenizer):
    log_probs, lengths = _ambiguous_posteriors(tokenizer)
    plain = ctc_prefix_beam_search(log_probs, lengths, beam_size=4)[0]
    assert tokenizer.decode(plain.tokens) == "kat"
    lm = train_lm(["cat", "the cat", "a cat sat"], tokenizer, order=3)
    fused = ctc_prefix_beam_search(log_probs, lengths, beam_size=4,
                                   fusion=LMFusion(lm, weight=0.5))[0]
    assert tokenizer.decode(fused.tokens) == "cat"
    # with weight 0 the fusion is the plain search
    zero = ctc_prefix_beam_search(log_probs, lengths, beam_size=4,
                                  fusion=LMFusion(lm, weight=0.0))[0]
    assert zero.tokens == plain.tokens


def test_fused_score_is_ctc_plus_weighted_lm(tokenizer):
    """With a beam wide enough to be exact on a tiny vocabulary, the best fused hypothesis
    maximises log P_ctc(y) + w log P_lm(y </s>) + b |y| over all label sequences."""
    from asrkd.decoding.ctc import ctc_sequence_log_prob

    small = CharTokenizer(list("ab"))
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(1, 5, small.vocab_size) * 2, dim=-1)
    lengths = torch.tensor([5])
    lm = train_lm(["ab", "aab", "b"], small, order=2)
    fusion = LMFusion(lm, weight=0.8, length_bonus=0.3)
    found = ctc_prefix_beam_search(log_probs, lengths, beam_size=64, prune_topk=small.vocab_size,
                                   fusion=fusion)[0]
    letters = small.encode("ab")
    best, best_score = None, -math.inf
    for n in range(0, 6):
        for seq in itertools.product(letters, repeat=n):
            ctc = float(ctc_sequence_log_prob(log_probs, lengths, torch.tensor([list(seq) or [0]]),
                                              torch.tensor([n]))[0])
            score = ctc + 0.8 * lm.sentence_log_prob(list(seq)) + 0.3 * n
            if score > best_score:
                best, best_score = list(seq), score
    assert found.tokens == best
    assert found.score == pytest.approx(best_score, abs=1e-4)


def test_unknown_word_penalty_is_exact_and_fixes_spelling():
    """With a word penalty the fused search maximises CTC + w LM + b |y| - p (#unknown
    words) over every label sequence; and it picks the known spelling of an ambiguous word."""
    from asrkd.decoding.ctc import ctc_sequence_log_prob

    small = CharTokenizer(list("ab "))
    torch.manual_seed(3)
    log_probs = torch.log_softmax(torch.randn(1, 5, small.vocab_size) * 2, dim=-1)
    lengths = torch.tensor([5])
    lm = train_lm(["ab a", "b ab", "a"], small, order=2)
    assert lm.words == {"a", "ab", "b"} and lm.word_prefixes == {"a", "ab", "b"}
    fusion = LMFusion(lm, weight=0.3, length_bonus=0.2, unk_penalty=2.0)
    found = ctc_prefix_beam_search(log_probs, lengths, beam_size=400,
                                   prune_topk=small.vocab_size, fusion=fusion)[0]
    symbols = [small.token_to_id[ch] for ch in "ab "]
    best, best_score = None, -math.inf
    for n in range(0, 6):
        for seq in itertools.product(symbols, repeat=n):
            ctc = float(ctc_sequence_log_prob(log_probs, lengths, torch.tensor([list(seq) or [0]]),
                                              torch.tensor([n]))[0])
            unknown = sum(w not in lm.words for w in small.decode(list(seq)).split())
            score = ctc + 0.3 * lm.sentence_log_prob(list(seq)) + 0.2 * n - 2.0 * unknown
            if score > best_score:
                best, best_score = list(seq), score
    assert found.tokens == best
    assert found.score == pytest.approx(best_score, abs=1e-4)
    with pytest.raises(ValueError, match="training words"):
        LMFusion(NGramLM(lm.order, lm.vocab_size, lm.bos_id, lm.eos_id, lm.log_probs,
                         lm.backoffs), unk_penalty=1.0)


def test_word_pieces_follow_word_boundaries():
    from asrkd.data.tokenizer import build_tokenizer

    char = CharTokenizer.english()
    pieces = char.word_pieces()
    assert len(pieces) == char.vocab_size
    assert [pieces[i] for i in char.encode("ab c")] == [(False, "a"), (False, "b"), (True, ""),
                                                        (False, "c")]
    bpe = build_tokenizer("bpe", TEXTS * 4, vocab_size=40)
    pieces = bpe.word_pieces()
    assert len(pieces) == bpe.vocab_size
    words, word = [], ""
    for token in bpe.encode("the cat sat"):
        starts, text = pieces[token]
        if starts and word:
            words.append(word)
            word = ""
        word += text
    assert words + [word] == ["the", "cat", "sat"]


def test_fusion_needs_ctc_beam(tokenizer):
    from asrkd.models.e2e_asr import build_model
    from test_e2e import random_batch, tiny_config

    model = build_model(tiny_config("none"), tokenizer)
    lm = train_lm(TEXTS, tokenizer, order=2)
    audio, lengths = random_batch()
    with pytest.raises(ValueError, match="ctc_beam"):
        model.infer(audio, lengths, method="ctc_greedy", fusion=LMFusion(lm))
    hypotheses = model.infer(audio, lengths, method="ctc_beam", fusion=LMFusion(lm))
    assert len(hypotheses) == 2


def test_lm_command_trains_tunes_and_evaluate_uses_it(tmp_path, tiny_corpus, capsys):
    """`asrkd lm --tune` stores the tuned weight; `asrkd evaluate --lm` and `infer --lm` use it."""
    import json

    from asrkd.cli import main
    from asrkd.models.e2e_asr import build_model, save_checkpoint
    from test_e2e import tiny_config

    torch.manual_seed(0)
    save_checkpoint(build_model(tiny_config("none"), CharTokenizer.english()), tmp_path / "m.ckpt")
    lm_path = tmp_path / "lm.json"
    assert main(["lm", "--ckpt", str(tmp_path / "m.ckpt"), "--manifest",
                 str(tiny_corpus / "train.jsonl"), "--order", "4", "--tune",
                 str(tiny_corpus / "val.jsonl"), "--beam-size", "2", "--words", "--out",
                 str(lm_path)]) == 0
    out = capsys.readouterr().out
    assert "perplexity on" in out and "best on" in out
    stored = NGramLM.load(lm_path)
    assert stored.order == 4 and stored.fusion["tuned_on"].endswith("val.jsonl")
    assert main(["evaluate", "--ckpt", str(tmp_path / "m.ckpt"), "--manifest",
                 str(tiny_corpus / "test.jsonl"), "--lm", str(lm_path), "--lm-weight", "0.3",
                 "--json", str(tmp_path / "m.json")]) == 0
    assert "weight 0.3" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["method"] == "ctc_beam" and metrics["lm"]["weight"] == 0.3
    wav = sorted((tiny_corpus / "wav" / "test").glob("*.wav"))[0]
    assert main(["infer", "--ckpt", str(tmp_path / "m.ckpt"), "--lm", str(lm_path),
                 str(wav)]) == 0
    assert main(["evaluate", "--ckpt", str(tmp_path / "m.ckpt"), "--lm-weight", "0.3"]) == 2
    assert "--lm-weight, --length-bonus and --unk-penalty need --lm" in capsys.readouterr().err
