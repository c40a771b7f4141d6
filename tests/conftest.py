"""Shared fixtures: a session-wide cache folder and one trained `tiny` baseline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from compress.recipe import recipe_from_dict

REPO = Path(__file__).resolve().parents[1]

# Small enough to train in seconds on 2 cores, large enough that its perplexity means something.
TINY_RECIPE: dict = {
    "name": "tiny",
    "model": {"preset": "tiny"},
    "data": {"corpus": "builtin", "vocab_size": 1024},
    "train": {
        "max_steps": 200,
        "max_minutes": None,  # the same baseline on a busy machine, only later
        "batch_size": 8,
        "seq_len": 128,
        "lr": 3e-3,
        "warmup_steps": 20,
        "eval_every": 100,
        "eval_batches": 2,
    },
    "eval": {
        "perplexity": {"split": "test", "seq_len": 128, "max_tokens": 8192},
        "latency": {"batch_size": 4, "seq_len": 128, "warmup": 1, "repeats": 5},
    },
    "variants": [
        {"name": "int8", "pipeline": [{"int8": {}}]},
        {"name": "nf4", "pipeline": [{"nf4": {}}]},
    ],
}


def shared_data() -> Path:
    """The shared real-text folder: ``$COMPRESS_SHARED_DATA`` or ``<repo>/../shared/data``."""
    root = os.environ.get("COMPRESS_SHARED_DATA")
    return Path(root) if root else REPO.parent / "shared" / "data"


def require_shared(rel: str) -> Path:
    """A file of the shared data folder; the test skips with the reason when it is absent."""
    path = shared_data() / rel
    if not path.is_file():
        pytest.skip(f"shared test data {path} is absent (set COMPRESS_SHARED_DATA to its folder)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _eager_by_default():
    """torch.compile (dynamic-int8 on torchao compiles the model by default) takes tens of
    seconds per model on 2 cores: with this set, ``torch.compile`` returns the eager function,
    in this process and the ones tests start, for fixtures of every scope; the tests of
    compilation itself unset it (``compiling``)."""
    previous = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    yield
    if previous is None:
        os.environ.pop("TORCHDYNAMO_DISABLE", None)
    else:
        os.environ["TORCHDYNAMO_DISABLE"] = previous


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole session, so the tiny baseline is trained once."""
    root = tmp_path_factory.mktemp("cache")
    os.environ["COMPRESS_CACHE_DIR"] = str(root)
    return root


@pytest.fixture(autouse=True)
def _use_session_cache(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(cache_root))
    # the tests' sweep workers share a gate with each other, not with real runs on the machine
    monkeypatch.setenv("COMPRESS_LOCK_DIR", str(cache_root / "locks"))


@pytest.fixture(scope="session")
def tiny_recipe_dict() -> dict:
    return yaml.safe_load(yaml.safe_dump(TINY_RECIPE))  # a deep copy


@pytest.fixture(scope="session")
def tiny_workspace(cache_root: Path, tiny_recipe_dict: dict):
    from compress.workbench import prepare

    recipe = recipe_from_dict(tiny_recipe_dict, "tiny.yaml", "tiny")
    return prepare(recipe, REPO, progress=False)


@pytest.fixture(scope="session")
def hf_model_dirs(tiny_workspace, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny trained GPT-2, OPT and Llama (GQA) model directories, by family (see hf_models)."""
    pytest.importorskip("transformers")
    from tests.hf_models import FAMILIES, build_trained, save_model_dir

    root = tmp_path_factory.mktemp("hf-models")
    ws = tiny_workspace
    return {
        family: save_model_dir(
            build_trained(family, ws.tokenizer, ws.tokens["train"]), ws.tokenizer, root / family
        )
        for family in FAMILIES
    }


def hf_recipe(model_dir: Path, **overrides) -> dict:
    """The tiny recipe on a Hugging Face model directory (its own tokenizer, no vocab_size)."""
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["name"] = f"tiny-{model_dir.name}"
    recipe["model"] = {"hf": str(model_dir)}
    recipe["data"] = {"corpus": "builtin"}
    recipe.pop("train")
    recipe.update(overrides)
    return recipe


@pytest.fixture
def compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile really compiles in this test (the other tests run eagerly)."""
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
