"""Stages as a reader would say them: ``prune 50% magnitude -> distill 60 steps -> int8``.

One place turns a stage's settings into text, so the report, the terminal and the sweep
report print a pipeline the same way. A stage is given as its name and settings (the recipe's
``{name: settings}`` form, a ``(name, settings)`` pair, or a stage report with ``stage`` and
``config``); settings left out take the compressor's defaults. Numbers are rounded for
reading (``0.15000000000000002`` reads ``15%``); the CSV and JSON keep the exact values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

ARROW = " -> "


def number(value: Any, digits: int = 4) -> str:
    """``value`` with at most ``digits`` significant digits and no float noise
    (``0.15000000000000002`` -> ``0.15``, ``1e-3`` -> ``0.001``, ``200`` -> ``200``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value == int(value) or abs(value) >= 10**digits:
        return str(round(value))
    text = f"{value:.{digits}g}"
    if "e" in text:
        mantissa, exp = text.split("e")
        if -5 <= int(exp) < 0:
            return f"{value:.{digits - int(exp) - 1}f}".rstrip("0").rstrip(".")
    return text


def percent(value: Any) -> str:
    """A fraction as a percentage, rounded: ``0.5`` -> ``50%``, ``0.125`` -> ``12.5%``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{number(round(value * 100, 2), 3)}%"


def _settings(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` over the compressor's defaults (the given ones alone if the stage is not
    registered or its settings do not validate)."""
    from compress.compressors import REGISTRY  # importing the package registers them

    comp = REGISTRY.get(name)
    if comp is None:
        return dict(given)
    try:
        return {**comp.config_cls.model_validate(dict(given)).model_dump(), **given}
    except (ValueError, TypeError):
        return dict(given)


def _targets(s: Mapping[str, Any]) -> str:
    targets = s.get("targets")
    return f" of {', '.join(map(str, targets))}" if targets else ""


def _prune(s: Mapping[str, Any]) -> str:
    text = f"prune {percent(s.get('sparsity'))} {s.get('method', 'magnitude')}"
    if s.get("pattern"):
        text += f" {s['pattern']}"
    if s.get("scope") == "global":
        text += " global"
    return text + _targets(s)


def _structured(s: Mapping[str, Any]) -> str:
    parts = [p for p, on in (("heads", s.get("prune_heads")), ("MLP", s.get("prune_mlp"))) if on]
    text = f"structured prune {percent(s.get('ratio'))} of {' + '.join(parts) or 'nothing'}"
    if s.get("residual_ratio"):
        text += f", {percent(s['residual_ratio'])} of the residual width"
    return f"{text} ({s.get('importance', 'magnitude')})"


def _given_steps(given: Mapping[str, Any]) -> Any:
    """A training stage's ``train.max_steps`` as given (older records: ``max_steps``)."""
    train = given.get("train") if isinstance(given.get("train"), Mapping) else {}
    return train.get("max_steps", given.get("max_steps"))


def _distill(s: Mapping[str, Any], given: Mapping[str, Any], steps: int | None = None) -> str:
    n = steps if steps is not None else _given_steps(given)
    text = "distill " + (f"{number(n)} steps" if n is not None else "(the run's training)")
    student = s.get("student")
    if isinstance(student, Mapping):
        sizes = ", ".join(f"{k} {number(v)}" for k, v in student.items())
        text += f" into a new student ({sizes})"
    if s.get("teacher", "baseline") != "baseline":
        text += f" from {s['teacher']}"
    return text


def _finetune(s: Mapping[str, Any], given: Mapping[str, Any], steps: int | None = None) -> str:
    n = steps if steps is not None else _given_steps(given)
    text = "finetune " + (f"{number(n)} steps" if n is not None else "(the run's training)")
    data = given.get("data")
    if isinstance(data, Mapping):
        if data.get("corpus") == "files":
            files = data.get("files")
            names = [f for v in files.values() for f in v] if isinstance(files, Mapping) else files
            text += f" on {', '.join(map(str, names or []))}"
        elif data.get("corpus") == "hf":
            text += f" on {data.get('path')}" + (f"/{data['name']}" if data.get("name") else "")
        else:
            text += " on the built-in corpus"
    return text


def _int8(s: Mapping[str, Any]) -> str:
    return "int8" + (f" (threshold {number(s['threshold'])})" if s.get("threshold") != 6.0 else "")


def _four_bit(name: str) -> Callable[[Mapping[str, Any]], str]:
    def describe(s: Mapping[str, Any]) -> str:
        return f"{name} (block {number(s.get('blocksize'))})" + _targets(s)

    return describe


def _dynamic(s: Mapping[str, Any]) -> str:
    return "dynamic int8" + ("" if s.get("per_channel", True) else " per tensor") + _targets(s)


def _weight_only(name: str) -> Callable[[Mapping[str, Any]], str]:
    def describe(s: Mapping[str, Any]) -> str:
        group = s.get("group_size")
        text = f"{name} {number(s.get('bits'))}-bit, " + (
            f"group {number(group)}" if group else "per channel"
        )
        return text + (" symmetric" if s.get("symmetric") else "") + _targets(s)

    return describe


_PHRASES: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "prune": _prune,
    "structured": _structured,
    "int8": _int8,
    "nf4": _four_bit("nf4"),
    "fp4": _four_bit("fp4"),
    "dynamic-int8": _dynamic,
    "rtn": _weight_only("rtn"),
    "gptq": _weight_only("gptq"),
    "awq": _weight_only("awq"),
}


def _generic(name: str, given: Mapping[str, Any]) -> str:
    inner = ", ".join(f"{k} {number(v)}" for k, v in given.items())
    return f"{name} ({inner})" if inner else name


def describe_stage(
    name: str, settings: Mapping[str, Any] | None = None, *, steps: int | None = None
) -> str:
    """One stage as text: ``prune 50% magnitude``, ``distill 60 steps``, ``rtn 4-bit, group
    128``. ``steps``: the optimizer steps a training stage actually ran, when known (it can
    stop early); otherwise its ``max_steps``."""
    given = dict(settings or {})
    if name == "finetune":
        return _finetune(given, given, steps)
    s = _settings(name, given)
    if name == "distill":
        return _distill(s, given, steps)
    phrase = _PHRASES.get(name)
    return phrase(s) if phrase is not None else _generic(name, given)


def _stage_of(item: Any) -> tuple[str, Mapping[str, Any], int | None]:
    if isinstance(item, str):
        return item, {}, None
    if isinstance(item, tuple):
        name, settings = item
        return name, settings or {}, None
    if isinstance(item, Mapping):
        ((name, settings),) = item.items()
        return name, settings or {}, None
    curve = getattr(item, "curve", None) or []  # a stage report: the steps it really ran
    steps = curve[-1].get("step") if curve else None
    return item.stage, item.config or {}, steps


def describe_pipeline(stages: Iterable[Any]) -> str:
    """Stages joined by `` -> ``; ``""`` for none (the baseline). Each item: ``{name:
    settings}``, ``(name, settings)``, a bare name, or a stage report (``stage``, ``config``,
    ``curve``)."""
    return ARROW.join(describe_stage(n, s, steps=k) for n, s, k in map(_stage_of, stages))
