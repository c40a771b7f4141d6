"""Saved Hugging Face variants as transformers sees them: bitsandbytes layers come back through
``quantization_config``; what transformers cannot represent is refused, and says why."""

from __future__ import annotations

import copy
import json
import re

import pytest

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.evaluate.perplexity import perplexity
from compress.models.adapter import adapter_for
from compress.models.hf import HFCausalLM, load_pretrained
from compress.variant import MANIFEST, OPAQUE_WEIGHTS, WEIGHTS, load_variant, save_variant
from tests.conftest import REPO

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it for bitsandbytes checkpoints


@pytest.fixture(scope="module")
def loaded(hf_model_dirs, tiny_workspace):
    ids = tiny_workspace.tokens["test"][:2048]
    return {f: load_pretrained(str(p), REPO)[0] for f, p in hf_model_dirs.items()}, ids


def _stages(model, *stages: tuple[str, dict]):
    model = copy.deepcopy(model)
    for name, settings in stages:
        cfg = REGISTRY[name].config_cls(**settings)
        model, _ = run_stage(name, model, cfg, StageContext(seed=0))
    return model


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
@pytest.mark.parametrize("stage", ["int8", "nf4"])
def test_bitsandbytes_variant_loads_with_from_pretrained(loaded, family, stage, tmp_path) -> None:
    models, ids = loaded
    # nf4 in bitsandbytes' plain layout: the packed CPU layout is refused (test below)
    q = _stages(models[family], (stage, {"cpu_kernel": "plain"} if stage == "nf4" else {}))
    save_variant(q, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())["transformers"]
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert manifest["from_pretrained"] and manifest["quantization_config"] == config
    assert config["llm_int8_skip_modules"] == ["lm_head"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    layer = "Linear8bitLt" if stage == "int8" else "Linear4bit"
    linears = sum(len(b.linears) for b in adapter_for(q).layout(q).blocks)
    assert sum(type(m).__name__ == layer for m in hf.modules()) == linears
    if stage == "nf4":  # see the manifest's note: bitsandbytes' bf16 CPU path, off in compress
        assert "support_avx512bf16_for_cpu" in manifest["note"]
        for m in hf.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    want = perplexity(q, ids, 128).perplexity
    assert perplexity(HFCausalLM(hf), ids, 128).perplexity == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize(
    ("family", "stages", "reason"),
    [
        ("opt", (("dynamic-int8", {}),), r"int8 layer \(dynamic-int8\)"),
        ("opt", (("dynamic-int8", {"backend": "torch.ao"}),), r"torch dynamic int8 layer"),
        ("opt", (("rtn", {"group_size": 32}),), r"compress packed int4/int8 layer \(rtn\)"),
        (
            "opt",
            (("int8", {"targets": ["fc1"]}), ("nf4", {"cpu_kernel": "plain"})),
            r"different settings",
        ),
        ("llama", (("int8", {"ignore": []}),), r"^lm_head \(the LM head\) is quantized"),
        ("gpt2", (("nf4", {}),), r"packed AVX512-BF16 CPU layout"),
    ],
)
def test_what_transformers_cannot_load_says_so(loaded, family, stages, reason, tmp_path) -> None:
    if "AVX512" in reason:
        from compress.compressors import bnb_cpu

        if not bnb_cpu.kernel_available():
            pytest.skip("nf4 is packed for the CPU kernel only on CPUs with AVX512-BF16")
    models, ids = loaded
    q = _stages(models[family], *stages)
    save_variant(q, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["transformers"]["from_pretrained"] is False
    assert re.search(reason, manifest["transformers"]["reason"])
    assert not (tmp_path / WEIGHTS).exists() and (tmp_path / OPAQUE_WEIGHTS).exists()
    with pytest.raises(OSError, match="no file named model.safetensors"):
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert perplexity(load_variant(tmp_path), ids, 128).perplexity == pytest.approx(
        perplexity(q, ids, 128).perplexity, rel=1e-6
    )
