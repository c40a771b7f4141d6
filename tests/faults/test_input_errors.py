"""Bad input is one line on stderr and exit 2, found before any work starts: no baseline is
trained (the cache holds none afterwards) and nothing is written to the report folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from compress.errors import RecipeError
from compress.recipe import load_recipe
from compress.run import main
from tests.conftest import require_shared

OK_VARIANTS = [{"name": "q", "pipeline": [{"int8": {}}]}]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(root))
    return root


def _files_recipe(tmp_path: Path, test_chars: int = 20_000, **overrides) -> dict:
    """A tiny-model recipe on three slices of Shakespeare written to ``tmp_path``."""
    text = require_shared("tinyshakespeare/input.txt").read_text()
    parts = {"train": text[:60_000], "valid": text[60_000:80_000]}
    parts["test"] = text[80_000 : 80_000 + test_chars]
    for split, part in parts.items():
        (tmp_path / f"{split}.txt").write_text(part)
    recipe = {
        "name": "bad",
        "model": {"preset": "tiny"},
        "data": {
            "corpus": "files",
            "files": {s: [str(tmp_path / f"{s}.txt")] for s in parts},
            "vocab_size": 300,
        },
        "train": {"max_steps": 5, "seq_len": 64},
        "eval": {"perplexity": {"seq_len": 64}, "latency": {"seq_len": 64}},
        "variants": OK_VARIANTS,
    }
    recipe.update(overrides)
    return recipe


def _run(tmp_path: Path, recipe: dict | str, *extra: str) -> tuple[int, str, Path]:
    """Run the CLI on ``recipe`` (a dict, dumped as YAML, or the file's text)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    report = tmp_path / "report"
    args = [str(path), "--no-progress", *extra]
    if "--report-dir" not in extra:
        args += ["--report-dir", str(report)]
    return main(args), str(path), report


def _assert_refused(
    capsys: pytest.CaptureFixture, code: int, cache: Path, report: Path, *words: str
) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for word in words:
        assert word in err, err
    assert not (cache / "baselines").exists(), "a baseline was trained before the check"
    assert not report.exists() or not any(report.iterdir())
    return err


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", ["recipe is empty", "variants"]),
        ("# only a comment\n", ["recipe is empty"]),
        ("name: x\n", ["variants: required key is missing"]),
        ("name: x\nvariants: []\n", ["variants: is empty"]),
        (
            "name: x\nseed: 1\nvariants: [{name: a, pipeline: [int8: {}]}]\nseed: 2\n",
            ["line 4", "duplicate key 'seed'", "first given on line 2"],
        ),
        (
            "name: x\nvariants:\n  - name: a\n"
            "    pipeline: [{int8: {threshold: 1, threshold: 2}}]\n",
            ["line 4", "duplicate key 'threshold'"],
        ),
        (
            f"name: x\nseed: {2**64}\nvariants: [{{name: a, pipeline: [int8: {{}}]}}]\n",
            ["seed: must be in [0, 2**63 - 1]"],
        ),
        ("name: x\nseed: -1\nvariants: [{name: a, pipeline: [int8: {}]}]\n", ["seed"]),
        ("a: &a [*a]\n", ["recursive alias"]),
    ],
)
def test_bad_recipe_text(tmp_path, cache, capsys, text, words) -> None:
    code, path, report = _run(tmp_path, text)
    _assert_refused(capsys, code, cache, report, path, *words)


def test_largest_seed_is_accepted(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"seed": 2**63 - 1, "variants": OK_VARIANTS}))
    assert load_recipe(path).seed == 2**63 - 1


def test_yaml_merge_keys_still_override(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "base: &b {threshold: 6.0}\n"[:0]
        + "variants:\n  - name: a\n    pipeline:\n      - int8: &s {threshold: 6.0}\n"
        "  - name: b\n    pipeline:\n      - int8: {<<: *s, threshold: 5.0}\n"
    )
    recipe = load_recipe(path)
    assert recipe.variants[1].pipeline[0]["int8"] == {"threshold": 5.0}


def _laughs(levels: int, width: int = 9) -> str:
    lines = [f"    l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines)


@pytest.mark.parametrize("where", ["variant", "sweep"])
def test_billion_laughs_is_refused_fast(tmp_path, cache, capsys, where) -> None:
    if where == "variant":
        text = "variants:\n  - name: a\n    pipeline:\n      - prune:\n" + _laughs(9).replace(
            "    l", "          l"
        )
    else:
        text = (
            "sweep:\n  params:\n    q: {choice: [none, int8]}\n  pipeline:\n"
            "    - int8:\n" + _laughs(9).replace("    l", "        l") + "\n      when: {q: int8}\n"
        )
    start = time.process_time()
    code, path, report = _run(tmp_path, text)
    assert time.process_time() - start < 10  # 9**9 values would take hours to walk
    _assert_refused(capsys, code, cache, report, path, "aliases expand it past 1,000,000")


def test_sweep_template_expanded_by_aliases_is_refused(tmp_path, cache, capsys) -> None:
    # under the document bound (9**5 values), over the template's: substituting every corner
    # of the space into it would take minutes
    text = (
        "sweep:\n  params:\n    q: {choice: [none, int8]}\n  pipeline:\n"
        "    - int8:\n" + _laughs(5).replace("    l", "        l") + "\n      when: {q: int8}\n"
    )
    code, path, report = _run(tmp_path, text)
    _assert_refused(capsys, code, cache, report, "sweep.pipeline", "more than 10,000 values")


def test_sweep_sampler_seed_beyond_numpy_range(tmp_path, cache, capsys) -> None:
    text = (
        f"seed: {2**40}\nsweep:\n  params:\n    q: {{choice: [none, int8]}}\n  pipeline:\n"
        "    - int8: {}\n      when: {q: int8}\n"
    )
    code, path, report = _run(tmp_path, text)
    _assert_refused(capsys, code, cache, report, "seed:", "[0, 2**32 - 1]")


def _validation_cpu_seconds(tmp_path: Path, n: int, tries: int) -> float:
    path = tmp_path / f"v{n}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"variants": [{"name": f"v{i}", "pipeline": [{"int8": {}}]} for i in range(n)]}
        )
    )
    best = float("inf")
    for _ in range(tries):
        start = time.process_time()
        assert len(load_recipe(path).variants) == n
        best = min(best, time.process_time() - start)
    return best


def test_validation_is_linear_in_the_number_of_variants(tmp_path) -> None:
    # CPU time (the small one best of three), and a bound three times the linear ratio (10x):
    # a quadratic validation (100x) fails it, a busy machine does not
    small = _validation_cpu_seconds(tmp_path, 400, tries=3)
    large = _validation_cpu_seconds(tmp_path, 4000, tries=1)
    assert large < 30 * max(small, 1e-3), (small, large)


def test_validation_error_for_late_variant_names_a_few_earlier_ones(tmp_path) -> None:
    variants = [{"name": f"v{i}", "pipeline": [{"int8": {}}]} for i in range(50)]
    variants.append({"name": "w", "from": "nope", "pipeline": [{"int8": {}}]})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"variants": variants}))
    with pytest.raises(RecipeError, match=r"variants\[50\]\.from: 'nope' is not") as err:
        load_recipe(path)
    assert "v49" in str(err.value) and "v10," not in str(err.value)


def test_distill_seq_len_beyond_block_size(tmp_path, cache, capsys) -> None:
    recipe = _files_recipe(
        tmp_path, variants=[{"name": "d", "pipeline": [{"distill": {"train": {"seq_len": 256}}}]}]
    )
    code, path, report = _run(tmp_path, recipe)
    _assert_refused(
        capsys,
        code,
        cache,
        report,
        "variants[0].pipeline[0].distill.train.seq_len = 256",
        "block size 128",
    )


def test_finetune_seq_len_beyond_block_size(tmp_path, cache, capsys) -> None:
    stage = {"finetune": {"train": {"max_steps": 5, "seq_len": 129}}}
    recipe = _files_recipe(tmp_path, variants=[{"name": "f", "pipeline": [stage]}])
    code, path, report = _run(tmp_path, recipe)
    _assert_refused(
        capsys, code, cache, report, "variants[0].pipeline[0].finetune.train.seq_len = 129"
    )


def test_distill_seq_len_in_sweep_beyond_block_size(tmp_path, cache, capsys) -> None:
    recipe = _files_recipe(tmp_path, variants=None)
    del recipe["variants"]
    recipe["sweep"] = {
        "params": {"d": {"choice": [False, True]}},
        "pipeline": [{"distill": {"train": {"seq_len": 200}}, "when": {"d": True}}],
    }
    code, path, report = _run(tmp_path, recipe)
    _assert_refused(capsys, code, cache, report, "sweep.pipeline[0].distill.train.seq_len = 200")


def test_distill_training_keys_given_flat_are_refused_with_the_nested_form(
    tmp_path, cache, capsys
) -> None:
    # earlier recipes gave them flat, with distillation's own defaults; now they nest under
    # train and default to the recipe's, so a flat key would silently mean something else
    distill = {"teacher": "baseline", "max_steps": 300, "lr": 0.001}
    recipe = _files_recipe(tmp_path, variants=[{"name": "d", "pipeline": [{"distill": distill}]}])
    code, path, report = _run(tmp_path, recipe)
    _assert_refused(
        capsys,
        code,
        cache,
        report,
        "variants[0].pipeline[0].distill",
        "lr, max_steps: training settings go under train",
        "distill: {train: {lr: 0.001, max_steps: 300}}",
    )


def test_a_stage_cannot_set_the_baseline_cache_policy(tmp_path, cache, capsys) -> None:
    stage = {"finetune": {"train": {"max_steps": 5, "partial": "accept"}}}
    recipe = _files_recipe(tmp_path, variants=[{"name": "f", "pipeline": [stage]}])
    code, path, report = _run(tmp_path, recipe)
    _assert_refused(
        capsys, code, cache, report, "finetune.train", "partial: only the baseline's training"
    )


def test_report_folder_is_a_file(tmp_path, cache, capsys) -> None:
    target = tmp_path / "taken"
    target.write_text("x")
    code, _, _ = _run(tmp_path, _files_recipe(tmp_path), "--report-dir", str(target))
    _assert_refused(capsys, code, cache, tmp_path / "none", f"{target} is a file, not a folder")
    code, _, _ = _run(tmp_path, _files_recipe(tmp_path), "--report-dir", str(target / "sub"))
    _assert_refused(capsys, code, cache, tmp_path / "none", "is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_report_folder_read_only(tmp_path, cache, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    code, _, _ = _run(tmp_path, _files_recipe(tmp_path), "--report-dir", str(ro / "out"))
    _assert_refused(capsys, code, cache, ro / "out", "is not writable")


def test_report_folder_not_writable_found_by_writing(tmp_path, cache, capsys, monkeypatch):
    # root ignores permission bits, so the probe's write is made to fail the way a read-only
    # mount fails it
    import compress.preflight as preflight

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(preflight.tempfile, "TemporaryFile", refuse)
    code, _, report = _run(tmp_path, _files_recipe(tmp_path))
    _assert_refused(capsys, code, cache, report, "report folder", "is not writable", "Read-only")


def test_sqlite_storage_in_missing_folder(tmp_path, cache, capsys) -> None:
    recipe = _files_recipe(tmp_path)
    del recipe["variants"]
    recipe["sweep"] = {
        "params": {"q": {"choice": ["none", "int8"]}},
        "pipeline": [{"int8": {}, "when": {"q": "int8"}}],
    }
    url = f"sqlite:///{tmp_path}/missing/sweep.db"
    code, _, report = _run(tmp_path, recipe, "--storage", url)
    _assert_refused(capsys, code, cache, report, f"{tmp_path}/missing does not exist")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"train": {"max_steps": 5, "seq_len": 128}}, ["valid split", "train.seq_len"]),
        (
            {"eval": {"perplexity": {"seq_len": 128}, "latency": {"seq_len": 64}}},
            ["test split", "eval.perplexity.seq_len"],
        ),
        (
            {"eval": {"perplexity": {"seq_len": 64, "max_tokens": 32}, "latency": {"seq_len": 64}}},
            ["max_tokens = 32", "shorter than one evaluation window"],
        ),
    ],
)
def test_split_too_short(tmp_path, cache, capsys, overrides, words) -> None:
    recipe = _files_recipe(tmp_path, test_chars=60, **overrides)
    if "train" in overrides:  # the train split is long: the valid split is the short one
        recipe["data"]["files"]["valid"] = recipe["data"]["files"]["test"]
    code, _, report = _run(tmp_path, recipe)
    _assert_refused(capsys, code, cache, report, *words)
