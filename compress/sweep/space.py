"""The ``sweep:`` section of a recipe: a search space, a pipeline template, objectives.

    sweep:
      trials: 30                       # completed trials to reach, baseline and seeds included
      objectives: [perplexity, latency_ratio, weight_bytes]     # all minimised
      constraints: [{metric: perplexity_ratio, max: 1.05}]      # optional
      params:                          # declared in order; `when` may name an earlier choice
        prune: {choice: [false, true]}
        sparsity: {float: [0.1, 0.8], step: 0.05, when: {prune: true}}
        quantizer: {choice: [none, int8, nf4, cpu-int8]}
      pipeline:                        # the template each trial fills in
        - prune: {sparsity: $sparsity}
          when: {prune: true}
        - int8: {}
          when: {quantizer: int8}
      seeds:                           # fixed first trials, after the baseline (trial 0)
        int8: {quantizer: int8}
      scan_seeds: true                 # also seed from the sensitivity scan (see below)
      reference: baseline              # or control: perplexity_ratio against the control

``reference: control`` compares each trial's perplexity with its compute-matched control
(:mod:`compress.control`: the baseline put through the trial's training stages; for a trial
that does not train, the baseline itself) instead of the baseline: every ``perplexity_ratio``
the sweep minimises, constrains or recommends by becomes ``perplexity_control_ratio``.

A ``$name`` string anywhere in a stage's settings is replaced by the trial's value of that
parameter. A stage or parameter with ``when: {param: value}`` (or a list of values) is active
only when that choice parameter is active and has one of those values. Every parameter's
default (``default:``, else a choice's first value) must switch every stage off: that
assignment is the baseline, always trial 0.

A prune stage may take its ``allocation`` from a choice parameter (``allocation: $alloc``
with ``alloc: {choice: [uniform, scan]}``): uniform or scan-derived per-layer sparsity is
then one more dimension of the search. With ``scan_seeds: true`` the sweep measures the
per-layer sensitivity scan first (:mod:`compress.scan`) and queues, after the recipe's seeds,
one trial per scanned sparsity inside the sparsity parameter's range with ``allocation: scan``
(and one each with ``scan-dense`` and ``scan-optimal`` when they are choices): the scan's own
proposals, measured before the sampler's.

Nothing here talks to Optuna's storage; :mod:`compress.sweep.runner` does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.metrics import objectives

Scalar = str | int | float | bool | None

METRICS: dict[str, str] = objectives()
RATIO, CONTROL_RATIO = "perplexity_ratio", "perplexity_control_ratio"
TRAINING_STAGES = ("distill", "finetune")  # compress.control's; not imported: no torch here
"""Metrics a sweep can minimise or constrain (row key -> label shown in the dashboard)."""

NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
VARIANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamSpec(_Strict):
    """One search dimension: exactly one of ``float``, ``int`` or ``choice``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    float_: tuple[float, float] | None = Field(None, alias="float")
    int_: tuple[int, int] | None = Field(None, alias="int")
    choice: list[Scalar] | None = Field(None, min_length=1)
    log: bool = False
    step: float | None = Field(None, gt=0)
    when: dict[str, Scalar | list[Scalar]] | None = None
    default: Scalar = None

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        given = [v for v in (self.float_, self.int_, self.choice) if v is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of float: [low, high], int: [low, high], choice: [..]"
            )
        if self.choice is not None:
            if self.log or self.step is not None:
                raise ValueError("log and step apply to float and int parameters only")
            if len(set(map(repr, self.choice))) != len(self.choice):
                raise ValueError(f"choices must be distinct, got {self.choice}")
            if "default" in self.model_fields_set and self.default not in self.choice:
                raise ValueError(f"default {self.default!r} is not one of {self.choice}")
            return self
        low, high = self.float_ if self.float_ is not None else self.int_  # type: ignore[misc]
        if not low < high:
            raise ValueError(f"low must be below high, got [{low}, {high}]")
        if self.log and low <= 0:
            raise ValueError(f"log scale needs low > 0, got {low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna's rule)")
        if self.int_ is not None and self.step is not None and self.step != int(self.step):
            raise ValueError(f"an int parameter's step must be whole, got {self.step}")
        if "default" in self.model_fields_set and self.default is not None:
            if isinstance(self.default, (bool, str)) or not low <= self.default <= high:
                raise ValueError(f"default must be a number in [{low}, {high}]")
        return self

    @property
    def kind(self) -> str:
        return "float" if self.float_ is not None else "int" if self.int_ is not None else "choice"

    def fallback(self) -> tuple[bool, Scalar]:
        """(has a default, the default): a choice defaults to its first value."""
        if "default" in self.model_fields_set:
            return True, self.default
        if self.choice is not None:
            return True, self.choice[0]
        return False, None

    def corners(self) -> list[Scalar]:
        """Values that validation substitutes: both bounds, or every choice."""
        if self.choice is not None:
            return list(self.choice)
        low, high = self.float_ if self.float_ is not None else self.int_  # type: ignore[misc]
        if self.step is not None:  # Optuna rounds high down onto the step grid
            high = low + math.floor((high - low) / self.step + 1e-9) * self.step
        return [low, high]

    def contains(self, value: Any) -> bool:
        if self.choice is not None:
            return any(value == c and type(value) is type(c) for c in self.choice)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        low, high = self.float_ if self.float_ is not None else self.int_  # type: ignore[misc]
        if self.int_ is not None and value != int(value):
            return False
        return low <= value <= high


class SamplerSpec(_Strict):
    name: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int | None = None  # defaults to the recipe's seed
    startup_trials: int = Field(10, ge=0, description="tpe: random trials before modelling")
    population: int = Field(20, ge=2, description="nsga2: population size")


class ConstraintSpec(_Strict):
    metric: str
    max: float

    @field_validator("metric")
    @classmethod
    def _known(cls, metric: str) -> str:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
        return metric


class RecommendSpec(_Strict):
    name: str = Field(min_length=1, max_length=80)
    where: dict[str, float] = Field(default_factory=dict)
    minimize: str

    @model_validator(mode="after")
    def _known(self) -> RecommendSpec:
        for metric in [*self.where, self.minimize]:
            if metric not in METRICS:
                raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
        return self


class HeartbeatSpec(_Strict):
    # A worker killed mid-trial stops its heartbeat; after `grace` seconds another worker (or
    # the next run) marks that trial failed and queues its parameters again.
    interval: int = Field(10, ge=1)
    grace: int = Field(60, ge=2)

    @model_validator(mode="after")
    def _grace_longer(self) -> HeartbeatSpec:
        if self.grace <= self.interval:
            raise ValueError(f"grace ({self.grace}) must exceed interval ({self.interval})")
        return self


class SweepSpec(_Strict):
    study: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", max_length=100)
    storage: str | None = None  # SQLAlchemy URL; default: sqlite file sweep.db in the report dir
    trials: int = Field(30, ge=1, le=100_000)
    timeout_minutes: float | None = Field(None, gt=0)
    max_failures: int | None = Field(None, ge=1, description="stop after this many failed trials")
    objectives: list[str] = Field(
        default_factory=lambda: ["perplexity", "latency_ratio", "weight_bytes"], min_length=1
    )
    constraints: list[ConstraintSpec] = Field(default_factory=list)
    recommend: list[RecommendSpec] | None = None  # default: derived from objectives
    sampler: SamplerSpec = SamplerSpec()
    heartbeat: HeartbeatSpec = HeartbeatSpec()
    params: dict[str, ParamSpec] = Field(min_length=1)
    pipeline: list[dict[str, Any]] = Field(min_length=1)
    seeds: dict[str, dict[str, Scalar]] = Field(default_factory=dict)
    scan_seeds: bool = False  # queue trials built from the sensitivity scan after the seeds
    reference: Literal["baseline", "control"] = "baseline"

    @model_validator(mode="after")
    def _against_control(self) -> SweepSpec:
        """With ``reference: control``, perplexity_ratio means perplexity_control_ratio."""
        if self.reference != "control":
            return self
        if not any(
            isinstance(item, dict) and set(item) & set(TRAINING_STAGES) for item in self.pipeline
        ):
            raise ValueError(
                "reference: control needs a stage that trains (distill or finetune) in the "
                "pipeline; without one every trial's control is the baseline"
            )
        named = [*self.objectives, *(c.metric for c in self.constraints)]
        for r in self.recommend or []:
            named += [*r.where, r.minimize]
        if RATIO not in named and (self.constraints or self.recommend is not None):
            raise ValueError(
                f"reference: control applies to {RATIO} (objectives, constraints, recommend), "
                "and none names it"
            )

        def swap(metric: str) -> str:
            return CONTROL_RATIO if metric == RATIO else metric

        update: dict[str, Any] = {
            "objectives": [swap(m) for m in self.objectives],
            "constraints": [
                ConstraintSpec(metric=swap(c.metric), max=c.max) for c in self.constraints
            ],
        }
        if self.recommend is not None:
            update["recommend"] = [
                RecommendSpec(
                    name=r.name,
                    where={swap(k): v for k, v in r.where.items()},
                    minimize=swap(r.minimize),
                )
                for r in self.recommend
            ]
        if len(set(update["objectives"])) != len(update["objectives"]):
            raise ValueError(
                f"objectives name {RATIO} and {CONTROL_RATIO}: the same with reference: control"
            )
        return self.model_copy(update=update)

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, objectives: list[str]) -> list[str]:
        for metric in objectives:
            if metric not in METRICS:
                raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
        if len(set(objectives)) != len(objectives):
            raise ValueError(f"objectives must be distinct, got {objectives}")
        return objectives


# ---------------------------------------------------------------------------------------------
# Pure functions over a validated spec


class SpaceError(ValueError):
    """A problem in the sweep section; ``key`` is its path below ``sweep``."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


def is_active(when: dict[str, Any] | None, values: dict[str, Any]) -> bool:
    if not when:
        return True
    for name, allowed in when.items():
        if name not in values:
            return False
        options = allowed if isinstance(allowed, list) else [allowed]
        if not any(values[name] == o and type(values[name]) is type(o) for o in options):
            return False
    return True


def split_stage(item: Any) -> tuple[dict[str, Any], dict | None]:
    """A template item -> (the one-key stage mapping, its `when` or None)."""
    if not isinstance(item, dict):
        return item, None
    when = item.get("when")
    return {k: v for k, v in item.items() if k != "when"}, when


def _substitute(value: Any, values: dict[str, Any], used: set[str]) -> Any:
    if isinstance(value, str) and value.startswith("$") and len(value) > 1:
        name = value[1:]
        if name not in values:
            raise KeyError(name)
        used.add(name)
        return values[name]
    if isinstance(value, dict):
        return {k: _substitute(v, values, used) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, values, used) for v in value]
    return value


def references(value: Any) -> set[str]:
    if isinstance(value, str) and value.startswith("$") and len(value) > 1:
        return {value[1:]}
    if isinstance(value, dict):
        return set().union(*(references(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(references(v) for v in value)) if value else set()
    return set()


def resolve_indexed(spec: SweepSpec, values: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(template index, stage) for each active template stage, ``$param`` filled in."""
    out = []
    for i, item in enumerate(spec.pipeline):
        stage, when = split_stage(item)
        if not is_active(when, values):
            continue
        try:
            out.append((i, _substitute(stage, values, set())))
        except KeyError as exc:
            raise SpaceError(
                f"pipeline[{i}]",
                f"uses ${exc.args[0]}, which is not active when this stage is "
                f"(give the stage a `when` that implies the parameter's)",
            ) from None
    return out


def resolve(spec: SweepSpec, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The trial's pipeline: active template stages with ``$param`` filled in."""
    return [stage for _, stage in resolve_indexed(spec, values)]


def active_params(spec: SweepSpec, values: dict[str, Any]) -> list[str]:
    return [n for n, p in spec.params.items() if is_active(p.when, values)]


def defaults(spec: SweepSpec, given: dict[str, Any] | None = None, where: str = "") -> dict:
    """``given`` completed with defaults for every other active parameter."""
    given = dict(given or {})
    for key in given:
        if key not in spec.params:
            raise SpaceError(
                where, f"unknown parameter {key!r}; parameters: {', '.join(spec.params)}"
            )
    values: dict[str, Any] = {}
    for name, p in spec.params.items():
        if not is_active(p.when, values):
            if name in given:
                raise SpaceError(f"{where}.{name}".lstrip("."), "is not active with these values")
            continue
        if name in given:
            if not p.contains(given[name]):
                raise SpaceError(
                    f"{where}.{name}".lstrip("."), f"{given[name]!r} is outside {_domain(p)}"
                )
            values[name] = given[name]
            continue
        ok, value = p.fallback()
        if not ok:
            raise SpaceError(
                f"{where}.{name}".lstrip("."),
                "has no value here and no `default:`; give one",
            )
        values[name] = value
    return values


def _domain(p: ParamSpec) -> str:
    if p.choice is not None:
        return f"the choices {p.choice}"
    low, high = p.float_ if p.float_ is not None else p.int_  # type: ignore[misc]
    return f"[{low}, {high}]"


def corner_assignments(spec: SweepSpec, limit: int = 4096) -> Iterator[dict[str, Any]]:
    """Assignments that together put every choice and every numeric bound through the
    template: the product of the choices (active-aware, up to ``limit``) with numbers at their
    lower bound, then each number at its upper bound."""
    names = list(spec.params)

    def walk(i: int, values: dict[str, Any], hi: str | None) -> Iterator[dict[str, Any]]:
        if i == len(names):
            yield dict(values)
            return
        name = names[i]
        p = spec.params[name]
        if not is_active(p.when, values):
            yield from walk(i + 1, values, hi)
            return
        corners = p.corners()
        options = corners if p.kind == "choice" else [corners[-1] if name == hi else corners[0]]
        for v in options:
            values[name] = v
            yield from walk(i + 1, values, hi)
            del values[name]

    numeric = [n for n, p in spec.params.items() if p.kind != "choice"]
    yield from itertools.islice(walk(0, {}, None), limit)
    for name in numeric:
        yield from itertools.islice(walk(0, {}, name), limit)


def check_structure(spec: SweepSpec) -> None:
    """Name rules, `when` references and `$param` references (no stage validation)."""
    seen: list[str] = []
    for name, p in spec.params.items():
        key = f"params.{name}"
        if not _is_name(name):
            raise SpaceError(key, "parameter names are letters, digits and _ (not first digit)")
        for other, allowed in (p.when or {}).items():
            if other not in seen:
                raise SpaceError(f"{key}.when.{other}", "must name a parameter declared earlier")
            q = spec.params[other]
            if q.kind != "choice":
                raise SpaceError(f"{key}.when.{other}", "`when` conditions on choice parameters")
            for v in allowed if isinstance(allowed, list) else [allowed]:
                if not q.contains(v):
                    raise SpaceError(f"{key}.when.{other}", f"{v!r} is not one of {q.choice}")
        seen.append(name)
    used: set[str] = set()
    for i, item in enumerate(spec.pipeline):
        stage, when = split_stage(item)
        key = f"pipeline[{i}]"
        if not isinstance(item, dict) or len(stage) != 1:
            raise SpaceError(
                key, "a template stage is a one-key mapping like {int8: {}}, plus an optional when"
            )
        for other, allowed in (when or {}).items() if isinstance(when, dict) else ():
            if other not in spec.params or spec.params[other].kind != "choice":
                raise SpaceError(f"{key}.when.{other}", "must name a choice parameter")
            q = spec.params[other]
            for v in allowed if isinstance(allowed, list) else [allowed]:
                if not q.contains(v):
                    raise SpaceError(f"{key}.when.{other}", f"{v!r} is not one of {q.choice}")
        if when is not None and not isinstance(when, dict):
            raise SpaceError(f"{key}.when", "must be a mapping {parameter: value or [values]}")
        refs = references(stage)
        for ref in sorted(refs - set(spec.params)):
            raise SpaceError(key, f"${ref} is not a declared parameter ({', '.join(spec.params)})")
        used |= refs
        if when:
            used |= set(when)
    for p in spec.params.values():
        used |= set(p.when or {})
    unused = [n for n in spec.params if n not in used]
    if unused:
        raise SpaceError(f"params.{unused[0]}", "is not used by the pipeline or any `when`")
    check_scan_seeds(spec)
    for name in spec.seeds:
        if not _is_variant_name(name) or name == "baseline":
            raise SpaceError(f"seeds.{name}", "seed names are like variant names, not 'baseline'")


ALLOCATIONS = ("scan", "scan-dense", "scan-optimal")


def _scan_stage(spec: SweepSpec) -> tuple[int, str, Any, dict] | None:
    """The first template prune stage whose ``allocation`` is a ``$choice`` parameter offering
    a scan allocation: (index, that parameter, its ``sparsity`` setting, its ``when``)."""
    for i, item in enumerate(spec.pipeline):
        stage, when = split_stage(item)
        settings = stage.get("prune") if isinstance(stage, dict) else None
        if not isinstance(settings, dict):
            continue
        alloc = settings.get("allocation")
        refs = references(alloc)
        if len(refs) != 1:
            continue
        (name,) = refs
        p = spec.params.get(name)
        if p is not None and p.choice is not None and any(a in p.choice for a in ALLOCATIONS):
            return i, name, settings.get("sparsity", 0.5), dict(when or {})
    return None


def check_scan_seeds(spec: SweepSpec) -> None:
    if spec.scan_seeds and _scan_stage(spec) is None:
        raise SpaceError(
            "scan_seeds",
            "needs a prune stage with `allocation: $param`, a choice parameter offering "
            f"{' or '.join(ALLOCATIONS)}",
        )


def scan_seed_assignments(spec: SweepSpec, sparsities: list[float]) -> dict[str, dict[str, Any]]:
    """Seed name -> full assignment, one per scanned sparsity the space can take, with the
    scan allocation(s) the allocation parameter offers; assignments the space rejects are
    left out."""
    found = _scan_stage(spec)
    if found is None:
        return {}
    _, alloc, sparsity, when = found
    gates = {k: (v[0] if isinstance(v, list) else v) for k, v in when.items()}
    sparsity_param = next(iter(references(sparsity)), None)
    p = spec.params[alloc]
    out: dict[str, dict[str, Any]] = {}
    for allocation in (a for a in ALLOCATIONS if a in (p.choice or [])):
        for s in sparsities:
            given: dict[str, Any] = {**gates, alloc: allocation}
            for other, allowed in (p.when or {}).items():
                given.setdefault(other, allowed[0] if isinstance(allowed, list) else allowed)
            if sparsity_param is not None:
                given[sparsity_param] = s
            elif sparsity != s:
                continue
            try:
                values = defaults(spec, given, where="scan_seeds")
            except SpaceError:
                continue
            name = f"scan-{allocation.removeprefix('scan').strip('-') or 'owl'}-{s:g}"
            out[name.replace("scan-owl", "scan")] = values
    return out


def _is_name(name: str) -> bool:
    import re

    return re.match(NAME, name) is not None


def _is_variant_name(name: str) -> bool:
    import re

    return re.match(VARIANT_NAME, name) is not None and len(name) <= 64


def default_recommendations(spec: SweepSpec) -> list[RecommendSpec]:
    """What the report recommends when the recipe does not say: under the recipe's
    constraints, the best variant per objective; without constraints, the fastest and the
    smallest variant within 1% and within 5% of the baseline's perplexity."""
    if spec.recommend is not None:
        return list(spec.recommend)
    out = []
    if spec.constraints:
        where = {c.metric: c.max for c in spec.constraints}
        cond = ", ".join(f"{m} <= {v:g}" for m, v in where.items())
        for metric in spec.objectives:
            out.append(
                RecommendSpec(name=f"lowest {metric} with {cond}", where=where, minimize=metric)
            )
        return out
    others = [m for m in spec.objectives if not m.startswith("perplexity")] or ["latency_ratio"]
    ratio = CONTROL_RATIO if spec.reference == "control" else RATIO
    for cap in (1.01, 1.05):
        for metric in others:
            out.append(
                RecommendSpec(
                    name=f"lowest {metric} within {round((cap - 1) * 100)}% of "
                    f"{spec.reference} perplexity",
                    where={ratio: cap},
                    minimize=metric,
                )
            )
    return out
