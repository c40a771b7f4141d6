"""The block-by-block calibration runner and the calibration windows it runs on."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.compressors.sequential import InputStats, output_error, run_sequential
from compress.data.calibration import CalibrationSpec, calibration_windows, merge
from compress.errors import CompressError
from compress.models.adapter import adapter_for
from compress.models.hf import load_pretrained
from tests.conftest import REPO


def _full_pass_stats(model, names, ids) -> dict[str, torch.Tensor]:
    """H of each named linear from one ordinary forward pass of the whole model."""
    stats = {n: InputStats(model.get_submodule(n).in_features) for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda _m, a, _o, s=stats[n]: s.add(a[0]))
        for n in names
    ]
    with torch.no_grad():
        for batch in ids.split(3):
            model(batch)
    for h in handles:
        h.remove()
    return {n: s.H for n, s in stats.items()}


def _models(tiny_workspace, hf_model_dirs):
    yield "builtin", tiny_workspace.baseline
    for family in ("gpt2", "opt", "llama"):
        yield family, load_pretrained(str(hf_model_dirs[family]), REPO)[0]


def test_blocks_run_alone_see_what_the_whole_model_feeds_them(
    tiny_workspace, hf_model_dirs
) -> None:
    """Without any change to the weights, the statistics the runner collects block by block
    (each block called with the mask / positions / rotary embeddings the model passed its
    first block) equal those of an ordinary forward pass, for every family and block."""
    ids = tiny_workspace.tokens["train"][: 7 * 40].view(7, 40)
    for family, model in _models(tiny_workspace, hf_model_dirs):
        layout = adapter_for(model).layout(model)
        names = {b.index: list(b.linears) for b in layout.blocks}
        want = _full_pass_stats(model, [n for ns in names.values() for n in ns], ids)
        seen: dict[str, torch.Tensor] = {}
        run_sequential(
            model,
            layout,
            ids,
            names,
            lambda _b, stats, seen=seen: seen.update({n: s.H for n, s in stats.items()}),
            batch_size=3,
        )
        assert set(seen) == set(want), family
        for name, H in want.items():
            torch.testing.assert_close(seen[name], H, rtol=1e-4, atol=1e-3, msg=f"{name}")


def test_later_blocks_see_the_changed_outputs_of_earlier_ones(tiny_workspace) -> None:
    model = copy.deepcopy(tiny_workspace.baseline)
    layout = adapter_for(model).layout(model)
    ids = tiny_workspace.tokens["train"][:256].view(4, 64)
    first, last = layout.blocks[0], layout.blocks[-1]
    seen = {}

    def zero_first_block(block, stats) -> None:
        if block.index == first.index:
            for name in stats:
                model.get_submodule(name).weight.data.zero_()
        seen.update({n: s.H.clone() for n, s in stats.items()})

    names = {first.index: list(first.linears), last.index: [last.mlp_up]}
    run_sequential(model, layout, ids, names, zero_first_block)
    want = _full_pass_stats(model, [last.mlp_up], ids)  # the model with block 0 changed
    torch.testing.assert_close(seen[last.mlp_up], want[last.mlp_up], rtol=1e-4, atol=1e-3)


def test_output_error_matches_its_definition() -> None:
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 16, generator=g), torch.randn(100, 16, generator=g)
    new = w.clone()
    new[:, :5] = 0
    st = InputStats(16)
    st.add(x)
    want = ((x @ w.t() - x @ new.t()) ** 2).sum() / ((x @ w.t()) ** 2).sum()
    assert output_error(w, new, st.H) == pytest.approx(float(want), rel=1e-5)
    assert output_error(w, w, st.H) == 0.0


def test_calibration_windows_are_seeded_cached_and_come_from_the_split(tiny_workspace) -> None:
    tokens = tiny_workspace.tokens
    spec = CalibrationSpec(samples=6, seq_len=32, seed=1)
    a = calibration_windows(tokens, spec, 128, "fp")
    b = calibration_windows(tokens, spec, 128, "fp")  # read back from the cache
    c = calibration_windows(tokens, spec.model_copy(update={"seed": 2}), 128, "fp")
    assert a.shape == (6, 32) and torch.equal(a, b) and not torch.equal(a, c)
    train = tokens["train"]
    for row in a:  # every window is a contiguous run of the train split
        hits = (train.unfold(0, 32, 1) == row).all(dim=1)
        assert bool(hits.any())
    assert calibration_windows(tokens, CalibrationSpec(samples=2), 128).shape == (2, 128)


def test_calibration_errors_name_the_key(tiny_workspace) -> None:
    tokens = tiny_workspace.tokens
    with pytest.raises(CompressError, match=r"prune\.calibration\.seq_len = 256 exceeds .* 128"):
        calibration_windows(tokens, CalibrationSpec(seq_len=256), 128, stage="prune")
    with pytest.raises(CompressError, match=r"calibration\.split: no tokenized 'valid' split"):
        calibration_windows({"train": tokens["train"]}, CalibrationSpec(split="valid"), 128)


def test_a_stage_overrides_only_the_keys_it_sets() -> None:
    recipe_level = CalibrationSpec(samples=64, seq_len=128, seed=3)
    merged = merge(recipe_level, CalibrationSpec.model_validate({"samples": 8}))
    assert merged == CalibrationSpec(samples=8, seq_len=128, seed=3)
    assert merge(None, None) == CalibrationSpec()
