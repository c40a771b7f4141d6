"""Hugging Face models: loading by path, the families' layouts, the saved form, perplexity."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.errors import CompressError
from compress.evaluate.perplexity import perplexity
from compress.models.adapter import LayoutError, adapter_for
from compress.models.hf import HFCausalLM, load_pretrained
from compress.recipe import recipe_from_dict
from compress.variant import load_variant, save_variant
from compress.workbench import prepare
from tests.conftest import REPO, hf_recipe

transformers = pytest.importorskip("transformers")

FAMILY = {"gpt2": "gpt2", "opt": "opt", "llama": "llama"}


@pytest.fixture(scope="module", params=sorted(FAMILY))
def loaded(request, hf_model_dirs) -> tuple[str, Path, HFCausalLM]:
    family = request.param
    model, _ = load_pretrained(str(hf_model_dirs[family]), REPO)
    return family, hf_model_dirs[family], model


def _ids(n: int = 2, t: int = 48, vocab: int = 1024) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(3))


def test_loaded_model_gives_the_original_logits(loaded) -> None:
    family, path, model = loaded
    original = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    x = _ids()
    with torch.inference_mode():
        want = original(input_ids=x, use_cache=False).logits
        got = model(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_layers_become_linear(hf_model_dirs) -> None:
    model, _ = load_pretrained(str(hf_model_dirs["gpt2"]), REPO)
    from transformers.pytorch_utils import Conv1D

    assert not any(isinstance(m, Conv1D) for m in model.modules())
    c_attn = model.get_submodule("hf.transformer.h.0.attn.c_attn")
    assert type(c_attn) is nn.Linear and c_attn.weight.shape == (3 * 64, 64)
    assert "hf.transformer.h.0.attn.c_attn" in model.conv1d


def test_layout_names_real_modules_with_their_widths(loaded) -> None:
    family, _, model = loaded
    adapter = adapter_for(model)
    assert adapter.family == FAMILY[family]
    lay = adapter.layout(model)
    assert len(lay.blocks) == 2 and lay.hidden == 64
    for block in lay.blocks:
        mods = {n: model.get_submodule(n) for n in block.linears}
        assert all(isinstance(m, nn.Linear) for m in mods.values())
        q_rows = block.n_heads * block.head_dim
        kv_rows = block.n_kv_heads * block.head_dim
        if block.qkv:
            assert mods[block.qkv].out_features == q_rows + 2 * kv_rows
        else:
            assert mods[block.q].out_features == q_rows
            assert mods[block.k].out_features == mods[block.v].out_features == kv_rows
        assert mods[block.o].in_features == q_rows
        assert mods[block.mlp_up].out_features == block.mlp_hidden
        assert mods[block.mlp_down].in_features == block.mlp_hidden
    if family == "llama":
        assert lay.blocks[0].n_kv_heads == 2 < lay.blocks[0].n_heads == 4
        assert lay.norm == "rmsnorm" and lay.pos_embed is None


def test_unknown_family_works_for_linear_stages_and_refuses_layout(tmp_path) -> None:
    cfg = transformers.GPTNeoXConfig(
        vocab_size=256,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path))
    model, _ = load_pretrained(str(tmp_path), REPO)
    with pytest.raises(LayoutError, match="gpt_neox.*no known block layout"):
        adapter_for(model).layout(model)
    q, report = run_stage("int8", model, REGISTRY["int8"].config_cls(), StageContext())
    assert len(report.touched) == 4  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    with pytest.raises(CompressError, match="no known block layout"):
        run_stage(
            "structured", copy.deepcopy(model), REGISTRY["structured"].config_cls(), StageContext()
        )


@pytest.mark.parametrize("stage", [None, "int8", "nf4", "dynamic-int8", "prune"])
def test_saved_variant_reloads_with_identical_outputs(loaded, stage, tmp_path) -> None:
    _, _, model = loaded
    model = copy.deepcopy(model)
    if stage:
        model, _ = run_stage(stage, model, REGISTRY[stage].config_cls(), StageContext())
    save_variant(model, tmp_path)
    again = load_variant(tmp_path)
    x = _ids()
    with torch.inference_mode():
        assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("stage", [None, "prune"])
def test_saved_float_variant_is_a_hugging_face_directory(loaded, stage, tmp_path) -> None:
    _, _, model = loaded
    model = copy.deepcopy(model)
    if stage:
        model, _ = run_stage(stage, model, REGISTRY[stage].config_cls(), StageContext())
    save_variant(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    x = _ids()
    with torch.inference_mode():
        torch.testing.assert_close(hf(input_ids=x, use_cache=False).logits, model(x))


def _guide_perplexity(hf, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """The loop of the Hugging Face guide "Perplexity of fixed-length models", with each
    window's scored tokens counted exactly (labels that are not -100 after the shift)."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq_len = ids.size(1)
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * n
        n_tokens += n
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("stride", [128, 48])
def test_perplexity_matches_the_hugging_face_guide(loaded, tiny_workspace, stride) -> None:
    _, path, model = loaded
    ids = tiny_workspace.tokens["test"][:3000]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    want = _guide_perplexity(hf, ids[None], max_length=128, stride=stride)
    got = perplexity(model, ids, seq_len=128, stride=stride, batch_size=4).perplexity
    assert got == pytest.approx(want, rel=1e-4)


def test_recipe_names_a_model_directory_and_gets_its_tokenizer(hf_model_dirs) -> None:
    path = hf_model_dirs["llama"]
    recipe = recipe_from_dict(hf_recipe(path), "r.yaml")
    ws = prepare(recipe, REPO, progress=False)
    assert isinstance(ws.baseline, HFCausalLM)
    assert ws.baseline_info.train is None and str(path) in str(ws.baseline_info.path)
    assert ws.tokenizer.fingerprint  # the model directory's own tokenizer
    again = prepare(recipe, REPO, progress=False)
    assert again.baseline_info.key == ws.baseline_info.key
    # a changed file in the directory is a different baseline
    (path / "extra.txt").write_text("x")
    try:
        assert prepare(recipe, REPO, progress=False).baseline_info.key != ws.baseline_info.key
    finally:
        (path / "extra.txt").unlink()


def test_context_longer_than_the_model_is_an_error_before_work(hf_model_dirs) -> None:
    data = hf_recipe(hf_model_dirs["opt"])
    data["eval"]["perplexity"]["seq_len"] = 256
    with pytest.raises(
        CompressError, match="eval.perplexity.seq_len = 256 exceeds the model's context length 128"
    ):
        prepare(recipe_from_dict(data, "r.yaml"), REPO, progress=False)


def test_missing_model_is_a_one_line_error(tmp_path) -> None:
    data = hf_recipe(tmp_path / "nope")
    data["model"]["hf"] = str(tmp_path / "no-such-dir")
    with pytest.raises(CompressError, match="model.hf: cannot load"):
        prepare(recipe_from_dict(data, "r.yaml"), REPO, progress=False)
