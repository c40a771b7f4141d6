"""The finetune stage: next-token training on another corpus with the run's tokenizer."""

from __future__ import annotations

import copy

import pytest

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.errors import CompressError, RecipeError
from compress.recipe import recipe_from_dict
from compress.settings import DataSpec
from compress.workbench import train_config
from tests.conftest import require_shared

SHAKESPEARE = "tinyshakespeare/input.txt"
STAGE = "variants[0].pipeline[0].finetune"


def _finetune(settings: dict):
    return REGISTRY["finetune"].config_cls.model_validate(settings)


def test_finetune_on_tiny_shakespeare_lowers_its_validation_loss(tiny_workspace, tmp_path) -> None:
    # the first 200 kB of the play text (read from the shared folder, written only to tmp_path)
    # keep the test cheap: tokenizing it takes about a second
    excerpt = tmp_path / "shakespeare.txt"
    excerpt.write_text(require_shared(SHAKESPEARE).read_text()[:200_000])
    ws = tiny_workspace
    train = {"max_steps": 20, "warmup_steps": 2, "eval_every": 10, "seq_len": 64, "batch_size": 4}
    cfg = _finetune({"data": {"corpus": "files", "files": [str(excerpt)]}, "train": train})
    ctx = StageContext(
        seed=0, tokens=ws.tokens, train=train_config(ws.recipe), load_tokens=ws.load_tokens
    )
    model, report = run_stage("finetune", copy.deepcopy(ws.baseline), cfg, ctx)
    extra = report.extra
    # the baseline never saw Shakespeare: 20 steps on it must lower its held-out loss clearly
    # (measured: 5.41 -> 4.95 nats/token)
    assert extra["val_loss_after"] < extra["val_loss_before"] - 0.2
    assert extra["steps"] == 20 and len(report.curve) == 20
    assert [r["step"] for r in report.curve if "val_loss" in r] == [10, 20]
    assert "shakespeare.txt" in extra["data"]
    # keys left out take the run's training settings
    train_cfg = cfg.train_config(ctx.train)
    assert train_cfg.max_steps == 20 and train_cfg.seq_len == 64 and train_cfg.batch_size == 4
    assert train_cfg.lr == ws.recipe.train.lr and train_cfg.eval_batches == 2
    assert train_cfg.seed == ws.recipe.seed
    # the weights changed, the baseline did not
    assert any((a != b).any() for a, b in zip(model.parameters(), ws.baseline.parameters()))


def test_finetune_defaults_to_the_runs_corpus_and_keeps_zeros(tiny_workspace) -> None:
    ws = tiny_workspace
    ctx = StageContext(seed=0, tokens=ws.tokens, train=train_config(ws.recipe))
    model = copy.deepcopy(ws.baseline)
    model, _ = run_stage("prune", model, REGISTRY["prune"].config_cls(sparsity=0.5), ctx)
    zeros = [(p == 0) for p in model.parameters() if p.dim() >= 2]
    cfg = _finetune({"train": {"max_steps": 3, "eval_every": 3, "seq_len": 32}})
    model, report = run_stage("finetune", model, cfg, ctx)
    after = [p for p in model.parameters() if p.dim() >= 2]
    assert all(bool((p[z] == 0).all()) for p, z in zip(after, zeros))
    assert report.extra["data"] == "the run's corpus" and report.extra["masked_tensors"] > 0


def _recipe(stage: dict) -> dict:
    return {"name": "ft", "variants": [{"name": "ft", "pipeline": [{"finetune": stage}]}]}


@pytest.mark.parametrize(
    ("stage", "key", "says"),
    [
        (
            {"train": {"max_stpes": 5}},
            f"{STAGE}.train.max_stpes",
            "max_steps",
        ),
        ({"data": {"corpus": "files"}}, f"{STAGE}.data", "non-empty"),
        ({"epochs": 2}, f"{STAGE}.epochs", "keep_sparsity"),
        (
            {"data": {"corpus": "builtin", "vocab_size": 512}},
            f"{STAGE}.data",
            "run's tokenizer",
        ),
        ({"train": {"lr": -1}}, f"{STAGE}.train.lr", "greater than 0"),
    ],
)
def test_bad_finetune_settings_are_one_line_errors(stage: dict, key: str, says: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(_recipe(stage), "ft.yaml")
    message = str(info.value)
    assert message.startswith(f"ft.yaml: {key}: ") and says in message
    assert "\n" not in message


def test_a_missing_finetune_file_stops_before_training(tmp_path) -> None:
    from compress.workbench import prepare

    recipe = recipe_from_dict(
        _recipe({"data": {"corpus": "files", "files": ["nowhere/*.txt"]}}), "ft.yaml"
    )
    with pytest.raises(CompressError, match="nowhere"):
        prepare(recipe, tmp_path, progress=False)


def test_load_tokens_uses_the_runs_tokenizer(tiny_workspace, tmp_path) -> None:
    path = tmp_path / "text.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 400)
    spec = DataSpec(corpus="files", files=[str(path)])
    tokens = tiny_workspace.load_tokens(spec)
    assert set(tokens) >= {"train", "valid"}
    assert int(tokens["train"].max()) < tiny_workspace.tokenizer.vocab_size
    assert tiny_workspace.load_tokens(spec) is tokens  # cached


def test_a_sweeps_missing_finetune_file_stops_before_training(tmp_path) -> None:
    from compress.workbench import prepare

    stage = {"finetune": {"data": {"corpus": "files", "files": ["gone.txt"]}}, "when": {"ft": True}}
    sweep = {
        "trials": 2,
        "objectives": ["perplexity"],
        "params": {"ft": {"choice": [False, True]}},
        "pipeline": [stage],
    }
    recipe = recipe_from_dict({"name": "s", "sweep": sweep}, "s.yaml")
    with pytest.raises(CompressError, match="gone.txt"):
        prepare(recipe, tmp_path, progress=False)
