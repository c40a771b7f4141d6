"""Structured pruning of Hugging Face models, cut by their layout: grouped-query attention kept
consistent, the fused GPT-2 projection cut head by head, the result reloads with
``AutoModelForCausalLM.from_pretrained`` to the same perplexity."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.compressors.structured_layout import attention_groups, prune_groups
from compress.errors import CompressError
from compress.evaluate.memory import param_count
from compress.evaluate.perplexity import perplexity
from compress.models.adapter import adapter_for
from compress.models.hf import HFCausalLM, load_pretrained
from compress.variant import load_variant, save_variant
from tests.conftest import REPO

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def loaded(hf_model_dirs, tiny_workspace):
    ids = tiny_workspace.tokens["test"][:2048]
    return {f: load_pretrained(str(p), REPO)[0] for f, p in hf_model_dirs.items()}, ids


def _structured(model, **settings):
    cfg = REGISTRY["structured"].config_cls(**settings)
    return run_stage("structured", copy.deepcopy(model), cfg, StageContext(seed=0))


def _reloads_to_the_same_perplexity(model, ids, path) -> float:
    ppl = perplexity(model, ids, 128).perplexity
    save_variant(model, path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert perplexity(HFCausalLM(hf), ids, 128).perplexity == pytest.approx(ppl, rel=1e-4)
    assert perplexity(load_variant(path), ids, 128).perplexity == pytest.approx(ppl, rel=1e-4)
    return ppl


def test_llama_gqa_loses_whole_kv_groups_and_reloads(loaded, tmp_path) -> None:
    models, ids = loaded
    base = models["llama"]
    assert (base.config.num_attention_heads, base.config.num_key_value_heads) == (4, 2)
    pruned, report = _structured(base, ratio=0.3)
    cfg = pruned.config
    # 2 kv heads * 0.7 -> 1 group kept (2 query heads); MLP 176 * 0.7 = 123.2 -> 120 (x8)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (2, 1, 120)
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    hd, hidden = 16, 64
    per_layer = (2 + 1 + 1 + 2) * hd * hidden + 3 * (176 - 120) * hidden  # q, k, v, o; MLP
    assert param_count(pruned) == param_count(base) - 2 * per_layer == 189760
    assert report.params_after == 189760
    assert report.extra["head_unit"] == "kv-group"
    _reloads_to_the_same_perplexity(pruned, ids, tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_mlp_channels_of_gpt2_and_opt_and_reload(loaded, family, tmp_path) -> None:
    models, ids = loaded
    base = models[family]
    pruned, report = _structured(base, ratio=0.3, prune_heads=False)
    width = pruned.config.n_inner if family == "gpt2" else pruned.config.ffn_dim
    assert width == 176  # 256 * 0.7 = 179.2 -> 176
    # per block: 80 rows of the up projection (weights and bias) and 80 columns of the down one
    assert param_count(pruned) == param_count(base) - 2 * 80 * (64 + 1 + 64)
    assert {t["module"].rsplit(".", 1)[-1] for t in report.touched} == (
        {"c_fc", "c_proj"} if family == "gpt2" else {"fc1", "fc2"}
    )
    _reloads_to_the_same_perplexity(pruned, ids, tmp_path)


@pytest.mark.parametrize(
    ("family", "settings", "message"),
    [
        ("gpt2", {}, r"^structured.prune_heads: gpt2: its config derives the head width"),
        ("opt", {}, r"^structured.prune_heads: opt: .*set prune_heads: false"),
        ("llama", {"residual_ratio": 0.25}, r"^structured.residual_ratio: llama: residual"),
    ],
)
def test_what_the_config_cannot_describe_is_refused(loaded, family, settings, message) -> None:
    models, _ = loaded
    with pytest.raises(CompressError, match=message):
        _structured(models[family], ratio=0.3, **settings)


@pytest.mark.parametrize(("family", "gone"), [("gpt2", 2), ("llama", 1)])
def test_removing_a_head_group_equals_silencing_it(loaded, family, gone) -> None:
    """Cutting a group's rows (GPT-2: from the fused q|k|v; Llama: q, k and v of one kv group)
    gives the logits of the full model whose output projection ignores those heads."""
    models, ids = loaded
    base = models[family]
    block = adapter_for(base).layout(base).blocks[0]
    x = ids[:256].view(2, 128)

    silenced = copy.deepcopy(base)
    sides = attention_groups(silenced, block, "kv-group")
    o = next(s for s in sides if s.dim == 1)
    with torch.no_grad():
        o.layer.weight[:, o.index[gone]] = 0

    cut = copy.deepcopy(base)
    sides = attention_groups(cut, block, "kv-group")
    keep = [g for g in range(len(sides[0].index)) if g != gone]
    prune_groups(sides, keep)
    if family == "gpt2":
        attn = cut.get_submodule(block.qkv.rsplit(".", 1)[0])
        attn.split_size = cut.get_submodule(block.o).in_features  # q|k|v each 3 heads wide
        assert cut.get_submodule(block.qkv).out_features == 3 * 3 * 16
    else:
        assert cut.get_submodule(block.k).out_features == 16
    with torch.inference_mode():
        torch.testing.assert_close(cut(x), silenced(x), rtol=1e-5, atol=1e-5)
