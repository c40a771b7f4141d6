"""Distillation into a smaller student of the teacher's own family (Hugging Face models)."""

from __future__ import annotations

import pytest

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.evaluate.memory import param_count
from compress.models.hf import HFCausalLM, load_pretrained
from compress.variant import save_variant
from tests.conftest import REPO

transformers = pytest.importorskip("transformers")

STUDENTS = {
    "gpt2": {"n_layer": 1, "n_inner": 128},
    "opt": {"num_hidden_layers": 1, "ffn_dim": 128},
    "llama": {"num_hidden_layers": 1, "intermediate_size": 96},
}


@pytest.mark.parametrize(
    "family",
    # one family in the default run (the same code path); the others with the slow tests
    [pytest.param(f, marks=[] if f == "llama" else pytest.mark.slow) for f in sorted(STUDENTS)],
)
def test_a_smaller_student_of_the_same_family_learns_from_the_loaded_model(
    hf_model_dirs, tiny_workspace, family, tmp_path
) -> None:
    teacher, _ = load_pretrained(str(hf_model_dirs[family]), REPO)
    train = {"max_steps": 30, "batch_size": 8, "seq_len": 64, "lr": 3e-3, "warmup_steps": 10}
    cfg = REGISTRY["distill"].config_cls(
        student=STUDENTS[family], train={**train, "eval_every": 15, "eval_batches": 2}
    )
    ctx = StageContext(seed=0, tokens=tiny_workspace.tokens, models={"baseline": teacher})
    student, report = run_stage("distill", teacher, cfg, ctx)
    assert isinstance(student, HFCausalLM) and type(student.hf) is type(teacher.hf)
    for key, value in STUDENTS[family].items():
        assert getattr(student.config, key) == value
    assert param_count(student) < param_count(teacher)
    # from a random start (~ln(vocab) = 6.9 nats), 30 steps must lower the validation loss
    before, after = report.extra["val_loss_before"], report.extra["val_loss_after"]
    assert after < before - 0.5, (before, after)
    save_variant(student, tmp_path)  # a Hugging Face directory of the smaller config
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert sum(p.numel() for p in hf.parameters()) == param_count(student)
