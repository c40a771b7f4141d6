"""Recipes: YAML in, a validated :class:`Recipe` out, or one error naming file, key and fix.

    name: int8                    # optional; defaults to the file name
    model: {preset: small}        # the built-in baseline GPT
    data: {corpus: builtin, vocab_size: 4096}
    train: {max_steps: 700}       # baseline training; cached under a key of all inputs
    calibration: {split: train, samples: 128, seed: 0}   # for wanda/sparsegpt/gptq/awq stages
    eval:
      perplexity: {split: test, seq_len: 256, stride: 256}
      latency: {batch_size: 8, seq_len: 256, threads: 2}
    variants:
      - name: int8
        pipeline:
          - int8: {threshold: 6.0}

Unknown keys are rejected everywhere. A pipeline stage is a one-key mapping from a registered
compressor name to its settings (``{}`` or nothing for the defaults).
"""

from __future__ import annotations

import gc
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from compress.compressors import REGISTRY, StageConfig
from compress.data.calibration import CalibrationSpec
from compress.errors import RecipeError
from compress.models.gpt import PRESETS
from compress.safe_yaml import load_yaml
from compress.scan.spec import ScanSpec
from compress.settings import DataSpec, Strict, TrainSpec
from compress.sweep.space import (
    SpaceError,
    SweepSpec,
    check_structure,
    corner_assignments,
    defaults,
    resolve,
    resolve_indexed,
)

MAX_SEED = 2**63 - 1  # torch seeds take any 64-bit integer; `seed + 1` must still fit
MAX_SAMPLER_SEED = 2**32 - 1  # Optuna's samplers seed numpy's RandomState
MAX_TEMPLATE_VALUES = 10_000  # a sweep's pipeline template, aliases expanded


class ModelSpec(Strict):
    """The baseline: the built-in GPT (``preset``, trained and cached on first use) or a
    Hugging Face causal LM (``hf``: a directory written by ``save_pretrained``, relative to the
    recipe's folder, or a hub id when a network is there)."""

    preset: Literal["tiny", "small"] | None = None
    hf: str | None = Field(None, min_length=1)
    revision: str | None = Field(None, min_length=1, description="hub models: branch/tag/commit")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False  # run the model repository's own Python code (hub models)

    @model_validator(mode="before")
    @classmethod
    def _default_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("hf") is None and data.get("preset") is None:
            return {**data, "preset": "small"}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if self.preset is not None and self.hf is not None:
            raise ValueError(
                "give either preset (the built-in GPT) or hf (a Hugging Face model), not both"
            )
        if self.hf is None and (self.revision is not None or self.trust_remote_code):
            raise ValueError("revision and trust_remote_code only apply to model.hf")
        return self


class PerplexitySpec(Strict):
    split: Literal["valid", "test"] = "test"
    seq_len: int = Field(256, ge=8)
    stride: int | None = Field(None, ge=1, description="defaults to seq_len (no overlap)")
    batch_size: int = Field(8, ge=1)
    max_tokens: int | None = Field(None, ge=16)

    @model_validator(mode="after")
    def _stride_le_seq_len(self) -> PerplexitySpec:
        if self.stride is not None and self.stride > self.seq_len:
            raise ValueError(f"stride {self.stride} must be <= seq_len {self.seq_len}")
        return self


class LatencySpec(Strict):
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(256, ge=1)
    threads: int | None = Field(None, ge=1, description="defaults to torch's thread count")
    warmup: int = Field(3, ge=0)
    repeats: int = Field(20, ge=3, description="alternating rounds timed at least")
    # More rounds follow until the 95% interval of a variant's latency ratio is within
    # ci_target of the ratio (half-width / ratio) or max_seconds of timing are spent; a ratio
    # still wider is marked noisy.
    ci_target: float = Field(0.03, gt=0, lt=1)
    max_seconds: float = Field(15.0, gt=0)


class MemorySpec(Strict):
    peak_rss: bool = True  # measure peak RSS of an inference run in a child process


class GenerationSpec(Strict):
    """Greedy continuations of held-out prompts, scored with BLEU and chrF (prompts: 0 skips
    them); small defaults keep a run fast."""

    prompts: int = Field(8, ge=0)
    prompt_tokens: int = Field(32, ge=1)
    new_tokens: int = Field(32, ge=1)


class EvalSpec(Strict):
    perplexity: PerplexitySpec = PerplexitySpec()
    latency: LatencySpec = LatencySpec()
    memory: MemorySpec = MemorySpec()
    generation: GenerationSpec = GenerationSpec()

    @property
    def generation_tokens(self) -> int:
        """The longest sequence generation feeds the model (0 when it is off)."""
        g = self.generation
        return g.prompt_tokens + g.new_tokens - 1 if g.prompts else 0


class VariantSpec(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    # The model this variant starts from: the baseline or a variant listed earlier, so that
    # prune -> distill -> quantize can report every intermediate step as its own row.
    start: str = Field("baseline", alias="from")
    pipeline: list[dict[str, Any]] = Field(min_length=1)


class ReportSpec(Strict):
    dir: str | None = None  # defaults to reports/<name>, relative to the working directory


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    seed: int = 0
    model: ModelSpec = ModelSpec()
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when torch sees one
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    calibration: CalibrationSpec = CalibrationSpec()  # a stage's `calibration:` overrides keys
    eval: EvalSpec = EvalSpec()
    variants: list[VariantSpec] = Field(default_factory=list)
    report: ReportSpec = ReportSpec()
    scan: ScanSpec | None = None  # per-layer sensitivity (python -m compress.scan)
    sweep: SweepSpec | None = None

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, seed: int) -> int:
        if not 0 <= seed <= MAX_SEED:
            raise ValueError("must be in [0, 2**63 - 1] (torch's seed range)")
        return seed

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, variants: list[VariantSpec]) -> list[VariantSpec]:
        seen: set[str] = set()
        dupes_set = {"baseline"} & {v.name for v in variants}
        for v in variants:
            if v.name in seen:
                dupes_set.add(v.name)
            seen.add(v.name)
        dupes = sorted(dupes_set)
        if dupes:
            raise ValueError(f"variant names must be unique and not 'baseline': {dupes}")
        return variants

    @model_validator(mode="after")
    def _fits_block_size(self) -> Recipe:
        if self.model.hf is not None:
            if "vocab_size" in self.data.model_fields_set:
                raise ValueError(
                    "data.vocab_size sets the built-in GPT's tokenizer; a Hugging Face model "
                    "(model.hf) brings its own tokenizer"
                )
            return self  # its context length is checked once the model's config is read
        block = PRESETS[self.model.preset]["block_size"]
        for key, n in (
            ("train.seq_len", self.train.seq_len),
            ("eval.perplexity.seq_len", self.eval.perplexity.seq_len),
            ("eval.latency.seq_len", self.eval.latency.seq_len),
            *stage_seq_lens(self),
            ("calibration.seq_len", self.calibration.seq_len or 0),
            ("scan.seq_len", self.scan.seq_len or 0 if self.scan else 0),
            ("eval.generation.prompt_tokens + new_tokens - 1", self.eval.generation_tokens),
        ):
            if n > block:
                raise ValueError(
                    f"{key} = {n} exceeds the '{self.model.preset}' model's block size {block}"
                )
        return self


def stage_seq_lens(recipe: Recipe) -> list[tuple[str, int]]:
    """``(key path, n)`` of every integer ``train.seq_len`` a pipeline stage asks for (distill
    and finetune train on windows of it): in the variants, and in a sweep's pipeline template."""
    found: list[tuple[str, int]] = []
    pipelines = [(f"variants[{i}].pipeline", v.pipeline) for i, v in enumerate(recipe.variants)]
    if recipe.sweep is not None:
        pipelines.append(("sweep.pipeline", recipe.sweep.pipeline))
    for where, pipeline in pipelines:
        for j, item in enumerate(pipeline):
            for name, settings in item.items():
                train = settings.get("train") if isinstance(settings, dict) else None
                n = train.get("seq_len") if isinstance(train, dict) else None
                if isinstance(n, int) and not isinstance(n, bool):
                    found.append((f"{where}[{j}].{name}.train.seq_len", n))
    return found


# ---------------------------------------------------------------------------------------------
# Loading and error messages


class Stage(typing.NamedTuple):
    name: str
    config: StageConfig


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found by following ``loc`` from ``cls`` (for 'allowed keys')."""
    current: Any = cls
    mapping = False  # the next part is a key of a mapping, not a field name
    for part in loc:
        if isinstance(part, int):
            continue
        if mapping:
            mapping = False
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return None
        current = _unwrap(field.annotation)
        if typing.get_origin(current) is dict:
            current = _unwrap(typing.get_args(current)[1])
            mapping = True
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(ann: Any) -> Any:
    origin = typing.get_origin(ann)
    if origin is dict:
        return ann
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(ann):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return ann


def _first_error(exc: ValidationError, cls: type[BaseModel], prefix: tuple = ()) -> tuple[str, str]:
    err = exc.errors()[0]
    loc = prefix + tuple(p for p in err["loc"] if p not in ("function-after",))
    if err["type"] == "extra_forbidden":
        parent = _model_at(cls, tuple(err["loc"][:-1]))
        allowed = (
            ", ".join(f.alias or n for n, f in parent.model_fields.items())
            if parent
            else "see the documentation"
        )
        return _key_path(loc), f"unknown key; allowed keys: {allowed}"
    if err["type"] == "missing":
        return _key_path(loc), "required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    if err["type"] not in ("model_type", "dict_type", "list_type") and not isinstance(
        got, (dict, list)
    ):
        msg += f", got {got!r}"
    return _key_path(loc), msg


def parse_stage(item: Any, where: str, file: str) -> Stage:
    names = ", ".join(sorted(REGISTRY))
    if not isinstance(item, dict) or len(item) != 1:
        raise RecipeError(
            file, where, f"a stage is a one-key mapping like {{int8: {{}}}}; compressors: {names}"
        )
    ((name, settings),) = item.items()
    if name not in REGISTRY:
        raise RecipeError(file, where, f"unknown compressor {name!r}; allowed: {names}")
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise RecipeError(file, f"{where}.{name}", f"settings must be a mapping, got {settings!r}")
    cls = REGISTRY[name].config_cls
    try:
        return Stage(name, cls.model_validate(settings))
    except ValidationError as exc:
        key, msg = _first_error(exc, cls)
        raise RecipeError(file, f"{where}.{name}.{key}".rstrip("."), msg) from None


def recipe_from_dict(data: Any, file: str = "<recipe>", default_name: str = "recipe") -> Recipe:
    if data is None:
        raise RecipeError(
            file, "", "the recipe is empty; it needs at least `variants` (or a `sweep:` section)"
        )
    if not isinstance(data, dict):
        raise RecipeError(file, "", f"the top level must be a mapping, got {type(data).__name__}")
    data = {"name": default_name, **data}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        key, msg = _first_error(exc, Recipe)
        raise RecipeError(file, key, msg) from None
    if recipe.sweep is None and not recipe.variants:
        given = "variants" in recipe.model_fields_set
        raise RecipeError(
            file,
            "variants",
            ("is empty" if given else "required key is missing")
            + ": list the variants to build (or give a `sweep:` section)",
        )
    earlier = {"baseline"}  # grows as the variants are read: validation stays linear
    for i, variant in enumerate(recipe.variants):
        if variant.start not in earlier:
            raise RecipeError(
                file,
                f"variants[{i}].from",
                f"{variant.start!r} is not the baseline or an earlier variant "
                f"({_names_before(recipe, i)})",
            )
        for j, item in enumerate(variant.pipeline):
            where = f"variants[{i}].pipeline[{j}]"
            stage = parse_stage(item, where, file)
            teacher = getattr(stage.config, "teacher", None)
            if teacher is not None and teacher not in earlier:
                raise RecipeError(
                    file,
                    f"{where}.{stage.name}.teacher",
                    f"{teacher!r} is not the baseline or an earlier variant "
                    f"({_names_before(recipe, i)})",
                )
        earlier.add(variant.name)
    if recipe.sweep is not None:
        _check_sweep(recipe, file)
    return recipe


def _count_values(data: Any, limit: int) -> int:
    """Values in ``data`` (shared sub-objects counted each time), counting stops past ``limit``."""
    n, stack = 0, [data]
    while stack and n <= limit:
        item = stack.pop()
        n += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return n


def _names_before(recipe: Recipe, i: int, shown: int = 10) -> str:
    """``baseline`` and the names of the variants before the ``i``-th, the last ``shown``."""
    names = ["baseline", *(v.name for v in recipe.variants[max(0, i - shown) : i])]
    return ", ".join(names[:1] + (["..."] if i > shown else []) + names[1:])


def _check_sweep(recipe: Recipe, file: str) -> None:
    """Everything a trial could resolve to must be a valid pipeline: checked at load over every
    choice and both bounds of every number, so no trial fails on a typo."""
    spec = recipe.sweep
    assert spec is not None
    if recipe.variants:
        raise RecipeError(
            file,
            "variants",
            "a recipe with a sweep lists its fixed variants under sweep.seeds, as parameter values",
        )
    seed_key = "sweep.sampler.seed" if spec.sampler.seed is not None else "seed"
    seed = spec.sampler.seed if spec.sampler.seed is not None else recipe.seed
    if not 0 <= seed <= MAX_SAMPLER_SEED:
        raise RecipeError(
            file, seed_key, f"the sampler's seed must be in [0, 2**32 - 1], got {seed}"
        )
    # Validation substitutes every corner of the space into the template: keep it small.
    if _count_values(spec.pipeline, MAX_TEMPLATE_VALUES) > MAX_TEMPLATE_VALUES:
        raise RecipeError(
            file,
            "sweep.pipeline",
            f"the template holds more than {MAX_TEMPLATE_VALUES:,} values (aliases expanded)",
        )
    try:
        check_structure(spec)
        base = defaults(spec, where="params")
        if on := resolve(spec, base):
            names = ", ".join(next(iter(stage)) for stage in on)
            raise SpaceError(
                "params",
                "with every parameter at its default the pipeline must be empty: that assignment "
                f"is the baseline, trial 0; the defaults switch on {names}",
            )
        checks = [
            (f"seeds.{n}", defaults(spec, g, where=f"seeds.{n}")) for n, g in spec.seeds.items()
        ]
        checks += [("params", values) for values in corner_assignments(spec)]
    except SpaceError as exc:
        raise RecipeError(file, f"sweep.{exc.key}", exc.problem) from None
    for origin, values in checks:
        try:
            stages = resolve_indexed(spec, values)
        except SpaceError as exc:
            raise RecipeError(file, f"sweep.{exc.key}", exc.problem) from None
        for i, item in stages:
            where = f"sweep.pipeline[{i}]"
            try:
                stage = parse_stage(item, where, file)
            except RecipeError as exc:
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                raise RecipeError(file, exc.key, f"{exc.problem} (at {origin}: {shown})") from None
            teacher = getattr(stage.config, "teacher", None)
            if teacher not in (None, "baseline"):
                raise RecipeError(
                    file, f"{where}.{stage.name}.teacher", "in a sweep the teacher is the baseline"
                )


def variant_stages(variant: VariantSpec) -> list[Stage]:
    """The typed stages of ``variant`` (validated already at load, so this cannot fail)."""
    return [parse_stage(item, variant.name, "<recipe>") for item in variant.pipeline]


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(file, "", "file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise RecipeError(file, "", f"cannot read: {exc}") from None
    # The cyclic garbage collector would walk every object built so far again and again while
    # a large recipe is built (2x the time at 20,000 variants); nothing here makes cycles.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return recipe_from_dict(load_yaml(text, file), file, default_name=path.stem)
    finally:
        if was_enabled:
            gc.enable()
