from __future__ import annotations

from pathlib import Path

import pytest

from compress.errors import RecipeError
from compress.recipe import load_recipe, recipe_from_dict, variant_stages

REPO = Path(__file__).resolve().parents[1]


def _err(data) -> str:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data, "recipes/x.yaml", "x")
    return str(info.value)


@pytest.mark.parametrize(
    "data,expected",
    [
        ({"bogus": 1}, "recipes/x.yaml: bogus: unknown key; allowed keys: name, seed, model"),
        (
            {"model": {"preset": "huge"}},
            "model.preset: Input should be 'tiny' or 'small', got 'huge'",
        ),
        (
            {"eval": {"perplexity": {"strid": 3}}},
            "eval.perplexity.strid: unknown key; allowed keys: split, seq_len, stride",
        ),
        (
            {"eval": {"perplexity": {"stride": 300}}},
            "eval.perplexity: stride 300 must be <= seq_len",
        ),
        (
            {"train": {"max_steps": 0}},
            "train.max_steps: Input should be greater than or equal to 1",
        ),
        ({"eval": {"latency": {"seq_len": 4096}}}, "eval.latency.seq_len = 4096 exceeds"),
        ({"data": {"corpus": "files"}}, "data: corpus 'files' needs a non-empty 'files'"),
        (
            {"variants": [{"name": "a", "pipeline": [{"int9": {}}]}]},
            "variants[0].pipeline[0]: unknown compressor 'int9'; allowed: awq, distill, "
            "dynamic-int8, finetune, fp4, gptq, int8, nf4, prune, rtn, structured",
        ),
        (
            {"variants": [{"name": "a", "pipeline": [{"int8": {"threshold": -1}}]}]},
            "variants[0].pipeline[0].int8.threshold: "
            "Input should be greater than or equal to 0, got -1",
        ),
        (
            {"variants": [{"name": "a", "pipeline": [{"nf4": {"blocksize": 7}}]}]},
            "variants[0].pipeline[0].nf4.blocksize: Input should be 32, 64, 128",
        ),
        (
            {"variants": [{"name": "a", "pipeline": [{"nf4": {"bits": 3}}]}]},
            "variants[0].pipeline[0].nf4.bits: unknown key; allowed keys: compute_dtype, blocksize",
        ),
        (
            {"variants": [{"name": "a", "pipeline": [{"int8": {}, "nf4": {}}]}]},
            "variants[0].pipeline[0]: a stage is a one-key mapping",
        ),
        (
            {"variants": [{"name": "a", "pipeline": []}]},
            "variants[0].pipeline: List should have at least 1",
        ),
        (
            {"variants": [{"name": "baseline", "pipeline": [{"int8": {}}]}]},
            "variants: variant names must be unique and not 'baseline'",
        ),
        (
            {"variants": [{"name": "a/b", "pipeline": [{"int8": {}}]}]},
            "variants[0].name: String should",
        ),
        ({"variants": [{"pipeline": [{"int8": {}}]}]}, "variants[0].name: required key is missing"),
        ([1, 2], "recipes/x.yaml: the top level must be a mapping, got list"),
        (
            {
                "variants": [
                    {"name": "a", "from": "b", "pipeline": [{"int8": {}}]},
                    {"name": "b", "pipeline": [{"int8": {}}]},
                ]
            },
            "recipes/x.yaml: variants[0].from: 'b' is not the baseline or an earlier variant",
        ),
        (
            {"variants": [{"name": "a", "pipeline": [{"distill": {"teacher": "a"}}]}]},
            "variants[0].pipeline[0].distill.teacher: 'a' is not the baseline or an earlier",
        ),
        (
            {"variants": [{"name": "a", "pipeline": [{"distill": {"student": {"layers": 2}}}]}]},
            "variants[0].pipeline[0].distill.student: student must be 'current' or a mapping",
        ),
        (
            {"variants": [{"name": "a", "pipeline": [{"prune": {"sparsity": 1.0}}]}]},
            "variants[0].pipeline[0].prune.sparsity: Input should be less than 1, got 1.0",
        ),
        (
            {"variants": [{"name": "a", "form": "b", "pipeline": [{"int8": {}}]}]},
            "variants[0].form: unknown key; allowed keys: name, from, pipeline",
        ),
    ],
)
def test_bad_recipes_name_file_key_and_allowed_values(data, expected) -> None:
    assert expected in _err(data)


def test_defaults_and_stage_parsing() -> None:
    r = recipe_from_dict({"variants": [{"name": "q", "pipeline": [{"int8": None}]}]}, "f", "dflt")
    assert r.name == "dflt" and r.model.preset == "small" and r.data.corpus == "builtin"
    (stage,) = variant_stages(r.variants[0])
    assert stage.name == "int8" and stage.config.threshold == 6.0


def test_variants_can_start_from_earlier_variants() -> None:
    r = recipe_from_dict(
        {
            "variants": [
                {"name": "p", "pipeline": [{"prune": {"sparsity": 0.5}}]},
                {"name": "r", "from": "p", "pipeline": [{"distill": {"teacher": "baseline"}}]},
                {"name": "q", "from": "r", "pipeline": [{"int8": {}}]},
            ]
        },
        "f",
        "chain",
    )
    assert [v.start for v in r.variants] == ["baseline", "p", "r"]


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="nope.yaml: file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants: [\n  - name: a\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: invalid YAML: line \d+, column \d+"):
        load_recipe(bad)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(evil)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    if recipe.sweep is not None:
        assert recipe.sweep.seeds, "a shipped sweep starts from the single-technique variants"
    else:
        assert recipe.variants, "a shipped recipe compares at least one variant"


HF_RECIPES = ("gpt2-wikitext2-int8.yaml", "gpt2-wikitext2-sweep.yaml")


@pytest.mark.parametrize("name", HF_RECIPES)
def test_gpt2_wikitext2_recipes_load_without_a_network(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    def offline(*args, **kwargs):
        raise AssertionError("loading a recipe must not use the network")

    monkeypatch.setattr(socket.socket, "connect", offline)
    recipe = load_recipe(REPO / "recipes" / name)
    assert recipe.model.hf == "gpt2" and recipe.model.preset is None
    data = recipe.data
    assert (data.corpus, data.path, data.name) == ("hf", "wikitext", "wikitext-2-raw-v1")
    ppl = recipe.eval.perplexity
    assert (ppl.seq_len, ppl.stride) == (1024, 512)  # GPT-2's context, the HF guide's stride
    if recipe.sweep is None:
        assert [s.name for v in recipe.variants for s in variant_stages(v)] == ["int8"]
    else:
        assert set(recipe.sweep.seeds) == {"int8", "nf4", "cpu-int8", "prune30"}


@pytest.mark.parametrize("name", HF_RECIPES)
def test_gpt2_wikitext2_recipes_offline_form_is_valid(name: str, tmp_path: Path) -> None:
    """The form their comments and the README document: a local model directory and the
    local WikiText-2 files."""
    import yaml

    data = yaml.safe_load((REPO / "recipes" / name).read_text())
    text = (REPO / "recipes" / name).read_text()
    assert "hf: /path/to/gpt2" in text and "corpus: files" in text
    valid, test = "wikitext-2/wiki.valid.tokens", "wikitext-2/wiki.test.tokens"
    data["model"] = {"hf": str(tmp_path / "gpt2")}
    data["data"] = {
        "corpus": "files",
        "files": {"train": [valid], "valid": [valid], "test": [test]},
    }
    recipe = recipe_from_dict(data, name, "x")
    assert recipe.model.hf == str(tmp_path / "gpt2") and recipe.data.files["test"] == [test]
