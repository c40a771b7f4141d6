"""Structured pruning on the trained tiny baseline: exact shapes, equivalence, quality."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.compressors.structured import StructuredConfig, residual_width, target_widths
from compress.errors import CompressError, RecipeError
from compress.evaluate.perplexity import perplexity
from compress.models.gpt import count_params
from compress.recipe import parse_stage
from compress.variant import load_variant, save_variant

IMPORTANCES = ["magnitude", "taylor", "lamp", "random"]


@pytest.fixture(scope="module")
def base(tiny_workspace):
    ws = tiny_workspace
    ids = ws.tokens["test"][:8192]
    ref = perplexity(ws.baseline, ids, 128).perplexity
    return ws, ids, ref


def _apply(ws, seed: int = 0, model: nn.Module | None = None, **settings):
    model = copy.deepcopy(ws.baseline).eval() if model is None else model
    cfg = StructuredConfig(**settings)
    return run_stage("structured", model, cfg, StageContext(seed=seed, tokens=ws.tokens))


def _leaves(model: nn.Module) -> set[str]:
    return {
        n
        for n, m in model.named_modules()
        if n and not list(m.children()) and list(m.parameters(recurse=False))
    }


def test_half_ratio_removes_one_head_and_half_the_mlp_exactly(base) -> None:
    ws, ids, _ = base
    cfg0 = ws.baseline.config
    assert (cfg0.n_head, cfg0.head_dim, cfg0.mlp_hidden) == (2, 32, 256)  # the tiny preset
    model, report = _apply(ws, ratio=0.5)
    C, L = cfg0.n_embd, cfg0.n_layer
    dh = (cfg0.n_head - 1) * cfg0.head_dim  # rows of q/k/v (and o_proj columns) removed
    dm = cfg0.mlp_hidden - 128  # fc_in rows (and fc_out columns) removed
    # q, k, v lose dh rows and dh biases; o_proj loses dh columns (its bias stays);
    # fc_in loses dm rows and dm biases; fc_out loses dm columns.
    removed = L * (3 * (dh * C + dh) + C * dh + (dm * C + dm) + C * dm)
    assert report.params_before - report.params_after == removed
    assert count_params(model) == count_params(ws.baseline) - removed
    assert model.config == dataclasses.replace(cfg0, n_head=1, mlp_hidden=128)
    assert all(b.attn.n_head == 1 for b in model.blocks)
    with torch.inference_mode():
        logits = model(ids[:256].view(2, 128))
    assert logits.shape == (2, 128, cfg0.vocab_size) and torch.isfinite(logits).all()
    assert report.weight_bytes_after < report.weight_bytes_before


def test_report_lists_every_shape_change_and_every_skip(base) -> None:
    ws, _, _ = base
    _, report = _apply(ws, ratio=0.5)
    C = ws.baseline.config.n_embd
    touched = {t["module"]: (t["from"], t["to"]) for t in report.touched}
    for i in range(ws.baseline.config.n_layer):
        p = f"blocks.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert touched[p + "attn." + proj] == ([64, C], [32, C])
        assert touched[p + "attn.o_proj"] == ([C, 64], [C, 32])
        assert touched[p + "mlp.fc_in"] == ([256, C], [128, C])
        assert touched[p + "mlp.fc_out"] == ([C, 256], [C, 128])
    assert len(touched) == 6 * ws.baseline.config.n_layer
    reasons = {s["module"]: s["reason"] for s in report.skipped}
    assert "embedding" in reasons["tok_emb"] and "embedding" in reasons["pos_emb"]
    assert "residual width" in reasons["ln_f"] and "residual width" in reasons["lm_head"]
    assert _leaves(ws.baseline) == set(reasons) | set(touched)  # nothing skipped silently
    assert report.extra == {
        "heads_before": 2,
        "heads_after": 1,
        "mlp_hidden_before": 256,
        "mlp_hidden_after": 128,
        "n_embd_before": 64,
        "n_embd_after": 64,
        "importance": "magnitude",
    }
    assert 0 < report.touched_bytes_after < report.touched_bytes_before


def test_pruned_model_equals_baseline_with_the_removed_units_silenced(base) -> None:
    """Removing heads/channels must equal zeroing their output columns in the dense model:
    proves q, k, v and o_proj lost the *same* head, and fc_in/fc_out the same channels."""
    ws, ids, _ = base
    model, _ = _apply(ws, ratio=0.5)
    dense = copy.deepcopy(ws.baseline).eval()
    hd = dense.config.head_dim
    with torch.no_grad():
        for b_dense, b_pruned in zip(dense.blocks, model.blocks):
            kept_rows = _kept_rows(b_dense.attn.q_proj.weight, b_pruned.attn.q_proj.weight)
            kept_heads = sorted({r // hd for r in kept_rows})
            assert kept_rows == [h * hd + j for h in kept_heads for j in range(hd)]
            for proj in ("k_proj", "v_proj"):
                dense_w = getattr(b_dense.attn, proj).weight
                assert torch.equal(dense_w[kept_rows], getattr(b_pruned.attn, proj).weight)
            cols = torch.ones(b_dense.attn.o_proj.in_features, dtype=torch.bool)
            cols[kept_rows] = False
            b_dense.attn.o_proj.weight[:, cols] = 0
            kept = _kept_rows(b_dense.mlp.fc_in.weight, b_pruned.mlp.fc_in.weight)
            cols = torch.ones(b_dense.mlp.fc_out.in_features, dtype=torch.bool)
            cols[kept] = False
            b_dense.mlp.fc_out.weight[:, cols] = 0
    x = ids[:256].view(2, 128)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-4)


def _kept_rows(dense: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Indices of the rows of ``dense`` that ``pruned`` kept, in order."""
    match = (pruned[:, None, :] == dense[None, :, :]).all(-1)  # (kept, all)
    assert (match.sum(1) == 1).all()
    rows = match.int().argmax(1).tolist()
    assert rows == sorted(rows)
    return rows


def test_pruned_variant_saves_and_reloads_identically(base, tmp_path) -> None:
    ws, ids, _ = base
    model, _ = _apply(ws, ratio=0.5)
    save_variant(model, tmp_path)
    again = load_variant(tmp_path)
    assert again.config == model.config
    x = ids[:256].view(2, 128)
    with torch.inference_mode():
        assert torch.equal(model(x), again(x))
    assert count_params(again) == count_params(model)


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_each_importance_prunes_and_stays_usable(base, importance) -> None:
    ws, ids, ref = base
    model, report = _apply(ws, ratio=0.5, importance=importance)
    assert report.extra["importance"] == importance
    assert (model.config.n_head, model.config.mlp_hidden) == (1, 128)
    ppl = perplexity(model, ids, 128).perplexity
    # Half the heads and MLP channels of a small model: a real cost, but far from broken
    # (the unigram model of this split scores ~370).
    assert ref < ppl < 1.25 * ref, (importance, ppl, ref)


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_same_seed_gives_identical_weights(base, importance) -> None:
    ws, _, _ = base
    a = _apply(ws, seed=3, ratio=0.5, importance=importance)[0].state_dict()
    b = _apply(ws, seed=3, ratio=0.5, importance=importance)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_importance_depends_on_the_seed(base) -> None:
    ws, _, _ = base
    a = _apply(ws, seed=0, ratio=0.5, importance="random")[0]
    b = _apply(ws, seed=1, ratio=0.5, importance="random")[0]
    assert not torch.equal(a.blocks[0].mlp.fc_in.weight, b.blocks[0].mlp.fc_in.weight)


def test_magnitude_and_taylor_beat_random_channels(base) -> None:
    # Measured on the tiny baseline with prune_heads=False, ratio 0.75 (256 -> 64 channels):
    # magnitude 270, taylor 272-285 over seeds 0-5, random 306-323 over seeds 0-5. Head choice
    # is left out on purpose: with 2 heads per block it is a coin flip, and at ratio 0.5 with
    # heads one random seed in four scored level with magnitude.
    ws, ids, _ = base
    settings = dict(ratio=0.75, prune_heads=False)
    ppl = {
        imp: perplexity(_apply(ws, seed=0, importance=imp, **settings)[0], ids, 128).perplexity
        for imp in ("magnitude", "taylor")
    }
    randoms = [
        perplexity(_apply(ws, seed=s, importance="random", **settings)[0], ids, 128).perplexity
        for s in range(3)
    ]
    assert ppl["magnitude"] < 0.95 * min(randoms), (ppl, randoms)
    assert ppl["taylor"] < 0.98 * min(randoms), (ppl, randoms)


@pytest.mark.parametrize("part", ["heads", "mlp"])
def test_one_part_only_leaves_the_other_untouched(base, part) -> None:
    ws, _, _ = base
    settings = {"prune_mlp": False} if part == "heads" else {"prune_heads": False}
    model, report = _apply(ws, ratio=0.5, **settings)
    touched = {t["module"] for t in report.touched}
    reasons = {s["module"]: s["reason"] for s in report.skipped}
    if part == "heads":
        assert (model.config.n_head, model.config.mlp_hidden) == (1, 256)
        assert "blocks.0.attn.q_proj" in touched and "blocks.0.mlp.fc_in" not in touched
        assert reasons["blocks.0.mlp.fc_in"].startswith("prune_mlp is false")
    else:
        assert (model.config.n_head, model.config.mlp_hidden) == (2, 128)
        assert "blocks.0.mlp.fc_in" in touched and "blocks.0.attn.q_proj" not in touched
        assert reasons["blocks.0.attn.o_proj"].startswith("prune_heads is false")
    assert len(touched) == (4 if part == "heads" else 2) * model.config.n_layer


@pytest.mark.parametrize("residual_ratio", [0.0, 0.25])
def test_mode_and_requires_grad_are_restored(base, residual_ratio) -> None:
    ws, _, _ = base
    model = copy.deepcopy(ws.baseline).train()
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("blocks.0."))
    model, _ = _apply(
        ws, model=model, ratio=0.5, residual_ratio=residual_ratio, importance="taylor"
    )
    assert not model.training
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith("blocks.0.")), name
        assert p.grad is None, name
    assert model.lm_head.weight is model.tok_emb.weight  # still tied


@pytest.mark.parametrize("residual_ratio", [0.0, 0.25])
def test_runs_inside_no_grad_and_inference_mode(base, residual_ratio) -> None:
    ws, _, _ = base
    a, b = copy.deepcopy(ws.baseline), copy.deepcopy(ws.baseline)
    with torch.no_grad():
        a, _ = _apply(ws, model=a, ratio=0.5, residual_ratio=residual_ratio)
    with torch.inference_mode():
        b, _ = _apply(ws, model=b, ratio=0.5, residual_ratio=residual_ratio, importance="taylor")
        with pytest.raises(CompressError, match="inference tensors"):
            _apply(ws, ratio=0.5)  # its deep copy is made in inference mode
    assert a.config.n_head == b.config.n_head == 1
    assert a.config.n_embd == b.config.n_embd == (64 if residual_ratio == 0 else 48)


@pytest.mark.parametrize(
    "n_head,mlp,ratio,want",
    [
        (4, 1024, 0.3, (3, 720)),
        (2, 256, 0.5, (1, 128)),
        (2, 256, 0.9, (1, 24)),
        (4, 12, 0.5, (2, 6)),
    ],
)
def test_target_widths_round_to_whole_heads_and_multiples_of_8(n_head, mlp, ratio, want) -> None:
    assert target_widths(n_head, mlp, StructuredConfig(ratio=ratio)) == want


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"ratio": 1.0}, "less than 1"),
        ({"ratio": 0.0}, "nothing to prune"),
        ({"ratio": -0.1}, "greater than or equal to 0"),
        ({"residual_ratio": 1.0}, "less than 1"),
        ({"residual_ratio": -0.1}, "greater than or equal to 0"),
        ({"prune_heads": False, "prune_mlp": False}, "nothing to prune"),
        ({"importance": "l1"}, "magnitude"),
        ({"sparsity": 0.5}, "unknown key"),
    ],
)
def test_bad_configs_are_rejected_at_load(settings, match) -> None:
    with pytest.raises(RecipeError, match=match):
        parse_stage({"structured": settings}, "variants[0].pipeline[0]", "x.yaml")
    with pytest.raises(ValidationError):
        StructuredConfig(**settings)


def test_a_ratio_that_removes_nothing_is_an_error(base) -> None:
    ws, _, _ = base
    with pytest.raises(CompressError, match="removes no whole head"):
        _apply(ws, ratio=0.01)
    with pytest.raises(CompressError, match="no residual channels"):
        _apply(ws, ratio=0.01, residual_ratio=0.01)  # 64 * 0.99 rounds back to 64


def test_taylor_without_train_tokens_is_an_error(base) -> None:
    ws, _, _ = base
    model = copy.deepcopy(ws.baseline)
    with pytest.raises(CompressError, match="train tokens"):
        run_stage("structured", model, StructuredConfig(importance="taylor"), StageContext())


def test_other_models_and_quantized_layers_are_refused(base) -> None:
    ws, _, _ = base
    with pytest.raises(CompressError, match="block layout is not known"):
        run_stage("structured", nn.Sequential(nn.Linear(4, 4)), StructuredConfig(), StageContext())
    model = copy.deepcopy(ws.baseline)
    model, _ = run_stage("int8", model, REGISTRY["int8"].config_cls(), StageContext())
    with pytest.raises(CompressError, match="before quantization"):
        run_stage("structured", model, StructuredConfig(), StageContext())


# --- residual-width (n_embd) pruning -------------------------------------------------------

RESIDUAL_LAYERS_OUT = ("ln_1", "attn.o_proj", "ln_2", "mlp.fc_out")  # residual = output side
RESIDUAL_LAYERS_IN = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")  # input side


def _gpt_params(cfg) -> int:
    """Parameters of a GPT with ``cfg``'s widths, from the layer shapes (LM head tied)."""
    C, inner, H = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.mlp_hidden
    block = (
        2 * 2 * C  # ln_1, ln_2: weight + bias
        + 3 * (inner * C + inner)  # q, k, v
        + (C * inner + C)  # o_proj
        + (H * C + H)  # fc_in
        + (C * H + C)  # fc_out
    )
    return cfg.vocab_size * C + cfg.block_size * C + cfg.n_layer * block + 2 * C  # + ln_f


@pytest.mark.parametrize(
    "n_embd,ratio,want",
    [(64, 0.1, 56), (64, 0.25, 48), (256, 0.1, 232), (256, 0.2, 208), (64, 0.01, 64),
     (64, 0.99, 8), (12, 0.5, 6), (256, 0.0, 256)],
)  # fmt: skip
def test_residual_width_rounds_to_multiples_of_8(n_embd, ratio, want) -> None:
    assert residual_width(n_embd, StructuredConfig(residual_ratio=ratio)) == want


def test_residual_pruning_shapes_params_config_and_report(base) -> None:
    ws, ids, _ = base
    cfg0 = ws.baseline.config
    model, report = _apply(ws, ratio=0.5, residual_ratio=0.25)
    want_cfg = dataclasses.replace(cfg0, n_head=1, mlp_hidden=128, n_embd=48)
    assert model.config == want_cfg
    assert _gpt_params(cfg0) == count_params(ws.baseline)  # the formula is right...
    assert count_params(model) == _gpt_params(want_cfg) == report.params_after  # ...and holds
    assert model.lm_head.weight is model.tok_emb.weight  # still tied
    assert (model.tok_emb.embedding_dim, model.pos_emb.embedding_dim) == (48, 48)
    assert model.ln_f.normalized_shape == (48,) and model.lm_head.in_features == 48
    touched = {t["module"]: (t["from"], t["to"]) for t in report.touched}
    V, B = cfg0.vocab_size, cfg0.block_size
    assert touched["tok_emb"] == ([V, 64], [V, 48])
    assert touched["pos_emb"] == ([B, 64], [B, 48])
    assert touched["lm_head"] == ([V, 64], [V, 48])
    assert touched["ln_f"] == ([64], [48])
    for i in range(cfg0.n_layer):
        p = f"blocks.{i}."
        assert touched[p + "ln_1"] == touched[p + "ln_2"] == ([64], [48])
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert touched[p + "attn." + proj] == ([64, 64], [32, 48])
        assert touched[p + "attn.o_proj"] == ([64, 64], [48, 32])
        assert touched[p + "mlp.fc_in"] == ([256, 64], [128, 48])
        assert touched[p + "mlp.fc_out"] == ([64, 256], [48, 128])
    assert set(touched) == _leaves(ws.baseline) and report.skipped == []
    assert report.extra["n_embd_before"] == 64 and report.extra["n_embd_after"] == 48
    # Every weight is touched, the tied embedding/head counted once.
    assert report.touched_bytes_before == report.weight_bytes_before
    assert report.touched_bytes_after == report.weight_bytes_after == 4 * count_params(model)
    with torch.inference_mode():
        logits = model(ids[:256].view(2, 128))
        out = model.generate(ids[:4].view(1, 4), max_new_tokens=5, temperature=0)
    assert logits.shape == (2, 128, cfg0.vocab_size) and torch.isfinite(logits).all()
    assert out.shape == (1, 9)


def test_residual_only_slices_every_layer_at_the_same_channels(base) -> None:
    """With ``ratio=0`` every tensor must equal the baseline's at the kept residual channels:
    the same channels in the embeddings, every norm, every projection and the tied head."""
    ws, _, _ = base
    model, report = _apply(ws, ratio=0, residual_ratio=0.5)
    dense = ws.baseline
    assert model.config == dataclasses.replace(dense.config, n_embd=32)
    keep = _kept_rows(dense.tok_emb.weight.T, model.tok_emb.weight.T)
    assert len(keep) == 32
    with torch.no_grad():
        assert torch.equal(model.pos_emb.weight, dense.pos_emb.weight[:, keep])
        assert torch.equal(model.lm_head.weight, dense.lm_head.weight[:, keep])
        pairs = [(model.ln_f, dense.ln_f)]
        for b, d in zip(model.blocks, dense.blocks):
            for name in RESIDUAL_LAYERS_OUT:
                pairs.append((b.get_submodule(name), d.get_submodule(name)))
            for name in RESIDUAL_LAYERS_IN:
                m, dm = b.get_submodule(name), d.get_submodule(name)
                assert torch.equal(m.weight, dm.weight[:, keep]), name
                assert torch.equal(m.bias, dm.bias), name  # outputs untouched
        for m, dm in pairs:  # residual on the output side: rows (or norm gains) and biases
            assert torch.equal(m.weight, dm.weight[keep])
            assert torch.equal(m.bias, dm.bias[keep])
    assert {s["module"] for s in report.skipped} == set()  # all layers touched, even q/k/v


def test_residual_pruned_variant_saves_and_reloads_identically(base, tmp_path) -> None:
    ws, ids, _ = base
    model, _ = _apply(ws, ratio=0.3, residual_ratio=0.1)
    assert model.config.n_embd == 56
    save_variant(model, tmp_path)
    again = load_variant(tmp_path)
    assert again.config == model.config
    assert again.lm_head.weight is again.tok_emb.weight
    assert count_params(again) == count_params(model)
    x = ids[:256].view(2, 128)
    with torch.inference_mode():
        assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_residual_pruning_stays_usable(base, importance) -> None:
    # Measured on the tiny baseline (ratio 0.3, residual 64 -> 48): perplexity 1.17x (taylor)
    # to 1.26x (magnitude, lamp) the baseline's; random seed 0 1.20x.
    ws, ids, ref = base
    model, _ = _apply(ws, ratio=0.3, residual_ratio=0.25, importance=importance)
    assert model.config.n_embd == 48
    ppl = perplexity(model, ids, 128).perplexity
    assert ref < ppl < 1.6 * ref, (importance, ppl, ref)


def _with_dead_residual_channels(model: nn.Module, dead: list[int]) -> nn.Module:
    """Zero residual channels ``dead`` everywhere they are stored: they carry nothing."""
    with torch.no_grad():
        model.tok_emb.weight[:, dead] = 0  # also the tied LM head
        model.pos_emb.weight[:, dead] = 0
        model.ln_f.weight[dead] = 0
        model.ln_f.bias[dead] = 0
        for b in model.blocks:
            for name in RESIDUAL_LAYERS_OUT:
                m = b.get_submodule(name)
                m.weight[dead] = 0
                m.bias[dead] = 0
            for name in RESIDUAL_LAYERS_IN:
                b.get_submodule(name).weight[:, dead] = 0
    return model


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "lamp", "random"])
def test_dead_residual_channels_are_the_ones_removed(base, importance) -> None:
    """A meaningful importance removes the residual channels that carry nothing. (Whether
    magnitude beats random on live channels is not reliable on the tiny model: its group score
    is dominated by the tied embedding's column norms, and over seeds random scored within a
    few percent of it either way.)"""
    ws, ids, _ = base
    dead = [3, 9, 17, 30, 40, 41, 58, 63]
    model = _with_dead_residual_channels(copy.deepcopy(ws.baseline).eval(), dead)
    settings = dict(ratio=0, residual_ratio=0.125, importance=importance)
    pruned, _ = _apply(ws, model=copy.deepcopy(model), **settings)
    assert pruned.config.n_embd == 56
    live = [c for c in range(64) if c not in dead]
    removed_dead = torch.equal(pruned.tok_emb.weight, model.tok_emb.weight[:, live])
    assert removed_dead == (importance != "random")
    with torch.inference_mode():
        assert torch.isfinite(pruned(ids[:256].view(2, 128))).all()


@pytest.mark.parametrize("importance", ["taylor", "random"])
def test_residual_pruning_is_deterministic(base, importance) -> None:
    ws, _, _ = base
    settings = dict(ratio=0.3, residual_ratio=0.25, importance=importance)
    a = _apply(ws, seed=3, **settings)[0].state_dict()
    b = _apply(ws, seed=3, **settings)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if importance == "random":
        c = _apply(ws, seed=4, **settings)[0]
        assert not torch.equal(c.tok_emb.weight, a["tok_emb.weight"])


def test_residual_only_may_leave_heads_and_mlp_alone(base) -> None:
    ws, _, _ = base
    for settings in (
        dict(ratio=0, residual_ratio=0.25),
        dict(prune_heads=False, prune_mlp=False, residual_ratio=0.25),
    ):
        model, report = _apply(ws, **settings)
        assert (model.config.n_head, model.config.mlp_hidden, model.config.n_embd) == (2, 256, 48)
        assert report.extra["heads_after"] == 2 and report.extra["mlp_hidden_after"] == 256
        # q/k/v/fc_in lose input columns and o_proj/fc_out rows: touched, not skipped.
        assert report.skipped == []


def test_residual_ratio_that_rounds_to_nothing_is_reported(base) -> None:
    ws, _, _ = base
    model, report = _apply(ws, ratio=0.5, residual_ratio=0.01)  # 64 * 0.99 rounds to 64
    assert model.config.n_embd == 64
    reasons = {s["module"]: s["reason"] for s in report.skipped}
    assert set(reasons) == {"tok_emb", "pos_emb", "lm_head", "ln_f"} | {
        f"blocks.{i}.{ln}" for i in range(2) for ln in ("ln_1", "ln_2")
    }
    assert "residual_ratio 0.01 removes no channels" in reasons["tok_emb"]
