"""Top-1 accuracy and agreement on the perplexity's scored tokens; greedy continuations scored
with BLEU and chrF against the text and against the baseline."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.evaluate.accuracy import top1
from compress.evaluate.generation import greedy, held_out_prompts, text_scores
from compress.evaluate.perplexity import perplexity, windows
from compress.metrics import Measurement
from compress.models.gpt import build_gpt
from compress.workbench import measure_quality


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_gpt("tiny", 48, n_layer=1, block_size=32).eval()


@pytest.mark.parametrize(("seq_len", "stride"), [(16, 16), (16, 5)])
def test_accuracy_matches_a_direct_computation(seq_len: int, stride: int) -> None:
    model = _model()
    ids = torch.randint(0, 48, (203,), generator=torch.Generator().manual_seed(1))
    ids[100:150] = ids[50:100]  # some structure, so the accuracy is not just chance
    hits = total = 0
    with torch.no_grad():
        for begin, end, score_from in windows(ids.numel(), seq_len, stride):
            logits = model(ids[begin:end][None])[0]  # (T, V)
            for t in range(score_from, end):  # target ids[t], predicted from position t-1
                hits += int(logits[t - 1 - begin].argmax()) == int(ids[t])
                total += 1
    result = top1(model, ids, seq_len, stride, batch_size=3)
    assert result.predicted.numel() == total == perplexity(model, ids, seq_len, stride).tokens
    assert result.accuracy == pytest.approx(hits / total, abs=1e-12)
    assert result.agreement(top1(copy.deepcopy(model), ids, seq_len, stride)) == 1.0
    other = top1(_model(seed=1), ids, seq_len, stride)
    assert 0 <= result.agreement(other) < 1
    expected = float((result.predicted == other.predicted).double().mean())
    assert result.agreement(other) == pytest.approx(expected)


def test_prompts_are_evenly_spaced_windows_followed_by_their_reference() -> None:
    ids = torch.arange(1000)
    pairs = held_out_prompts(ids, 4, prompt_tokens=8, new_tokens=5)
    assert pairs.prompts.shape == (4, 8) and pairs.references.shape == (4, 5)
    assert pairs.prompts[:, 0].tolist() == [0, 329, 658, 987]
    assert torch.equal(pairs.references[:, 0], pairs.prompts[:, -1] + 1)
    assert int(pairs.references[-1, -1]) == 999  # the last window ends at the stream's end
    with pytest.raises(ValueError):
        held_out_prompts(torch.arange(10), 1, 8, 5)


def test_greedy_is_the_models_own_greedy_decoding() -> None:
    model = _model()
    prompts = torch.randint(0, 48, (3, 6), generator=torch.Generator().manual_seed(2))
    expected = model.generate(prompts, 7, temperature=0)[:, 6:]
    assert torch.equal(greedy(model, prompts, 7), expected)


def test_text_scores_are_100_for_identical_text_and_lower_otherwise() -> None:
    refs = ["the quick brown fox jumps over the lazy dog", "to be or not to be, that is it"]
    same = text_scores(refs, refs)
    assert same.bleu == pytest.approx(100) and same.chrf == pytest.approx(100)
    # degenerate text (only whitespace, or too short for 4-grams) is still the same text
    for degenerate in (["\n\n", "."], ["a b", "c"]):
        assert text_scores(degenerate, degenerate) == text_scores(refs, refs)
    other = text_scores(["the quick brown cat sat on a mat today", "to be or not"], refs)
    assert 0 < other.bleu < 100 and 0 < other.chrf < 100


def test_a_copy_of_the_baseline_has_full_fidelity_and_agreement(tiny_workspace) -> None:
    ws = tiny_workspace
    base, same = Measurement(), Measurement()
    texts = measure_quality(ws, ws.baseline, base)
    copy_texts = measure_quality(ws, copy.deepcopy(ws.baseline), same)  # computed, not reused
    assert copy_texts == texts and len(texts) == ws.recipe.eval.generation.prompts
    assert same.top1_agreement == 1.0 and base.top1_agreement == 1.0
    assert same.bleu_fidelity == pytest.approx(100) and same.chrf_fidelity == pytest.approx(100)
    assert same.top1_accuracy == base.top1_accuracy
    assert (same.bleu, same.chrf) == (base.bleu, base.chrf)
    # the trained tiny model predicts far better than chance on held-out text (measured 0.083,
    # chance 1/1024)
    assert 20 / ws.tokenizer.vocab_size < base.top1_accuracy < 1
    row = same.to_dict()
    assert row["top1_agreement_shortfall"] == 0.0
    assert row["bleu_fidelity_shortfall"] == pytest.approx(0, abs=1e-9)


def test_a_pruned_variant_disagrees_with_the_baseline(tiny_workspace) -> None:
    ws = tiny_workspace
    ctx = StageContext(seed=0, tokens=ws.tokens)
    cfg = REGISTRY["prune"].config_cls(sparsity=0.7)
    model, _ = run_stage("prune", copy.deepcopy(ws.baseline), cfg, ctx)
    base, pruned = Measurement(), Measurement()
    base_texts = measure_quality(ws, ws.baseline, base)
    texts = measure_quality(ws, model, pruned)
    assert pruned.top1_agreement < 0.95
    assert pruned.top1_accuracy < base.top1_accuracy
    assert (pruned.chrf_fidelity < 100) == (texts != base_texts)
