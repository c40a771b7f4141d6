"""Training curves of a run: TensorBoard event files and one small chart per phase.

A phase is one training run inside a compress run: ``baseline`` (the built-in GPT, also when it
came from the cache, which keeps its curve) or ``<variant>/<stage>`` (a distill or finetune
stage; ``<variant>/<stage>-<i>`` when a pipeline has the stage twice). Its curve is the list of
per-step records :func:`compress.train.train` hands to ``on_log``. The event files go to
``<report>/tb/<phase>/``, so ``tensorboard --logdir <report>/tb`` shows every phase as a run.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from compress.report.plots import svg_bytes

logger = logging.getLogger(__name__)

TAGS: dict[str, str] = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "lr": "lr",
    "grad_norm": "grad_norm",
    "tokens_per_s": "tokens_per_s",
}
"""Record key -> TensorBoard scalar tag."""


def write_tensorboard(root: Path, curves: Mapping[str, Sequence[dict]]) -> dict[str, Path]:
    """One event file per phase under ``root/<phase>/``, one point per logged step and tag
    (val loss at the steps that validated). ``root`` is replaced: a rerun does not add a second
    copy of a phase's points. Returns phase -> its folder."""
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when needed

    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    out: dict[str, Path] = {}
    for phase, records in curves.items():
        if not records:
            continue
        folder = root / phase
        writer = SummaryWriter(log_dir=str(folder))
        try:
            for record in records:
                for key, tag in TAGS.items():
                    value = record.get(key)
                    if value is not None:
                        writer.add_scalar(tag, float(value), int(record["step"]))
        finally:
            writer.close()
        out[phase] = folder
    logger.info("TensorBoard event files for %d phases under %s", len(out), root)
    return out


def curve_svg(records: Sequence[dict], title: str) -> bytes:
    """Training loss at every step and validation loss at the steps that validated (SVG)."""
    fig = Figure(figsize=(6.0, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["train_loss"] for r in records], color="#4C72B0", lw=1, label="train loss")
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "o-", color="#DD8452", lw=1.5, ms=4, label="val loss")
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    return svg_bytes(fig, legend=True)


def curve_charts(curves: Mapping[str, Sequence[dict]]) -> list[tuple[str, bytes]]:
    """``(title, svg)`` per phase that has a curve."""
    return [
        (f"{phase}: loss vs step", curve_svg(records, phase))
        for phase, records in curves.items()
        if records
    ]
