"""What ``AutoModelForCausalLM.from_pretrained`` can rebuild of a compressed Hugging Face model.

A saved HF variant's folder holds ``config.json`` and ``model.safetensors`` under the model's
own names (see :mod:`compress.models.hf`). Float variants (magnitude- or structurally pruned,
distilled) load as they are, once the config describes the pruned widths. bitsandbytes layers
load too when ``config.json`` carries transformers' ``quantization_config`` (quant_method
``bitsandbytes``): from_pretrained then builds ``Linear8bitLt``/``Linear4bit`` layers and fills
them from the saved codes and scales (it needs ``accelerate`` installed). transformers has one
bitsandbytes setting per model, so a model whose layers were quantized with different settings
(e.g. int8 here, nf4 there) cannot be described; neither can torch's dynamic int8 layers or
compress's packed int4/int8 (rtn) layers, which no transformers quantizer reads.

:func:`export_status` says which case a model is and, for bitsandbytes, the config to write;
the answer goes into the variant's manifest under ``transformers``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch.nn as nn

from compress.evaluate.memory import is_packed_linear

# bitsandbytes' lazy CPU repacking on AVX512-BF16 machines, which compress turns off for plain
# 4-bit layers (see compress.compressors.quantize.keep_plain_layout) and from_pretrained leaves on.
FOUR_BIT_CPU_NOTE = (
    "on a CPU with AVX512-BF16, bitsandbytes repacks Linear4bit weights at the first forward "
    "and computes in bfloat16 (outputs differ slightly; layers whose width it cannot pack "
    "raise); set support_avx512bf16_for_cpu = False on every Linear4bit after loading to get "
    "the saved variant's numbers"
)


def _bnb_setting(m: nn.Module) -> dict | None:
    """transformers' ``quantization_config`` for one bitsandbytes layer (None: not one)."""
    kind = type(m).__name__
    if kind == "Linear8bitLt":
        return {
            "quant_method": "bitsandbytes",
            "load_in_8bit": True,
            "llm_int8_threshold": float(m.state.threshold),
        }
    if kind == "Linear4bit":
        qs = m.weight.quant_state
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": qs.quant_type,
            "bnb_4bit_compute_dtype": str(m.compute_dtype).removeprefix("torch."),
            "bnb_4bit_use_double_quant": bool(qs.nested),
        }
    return None


def export_status(model: nn.Module, root: str, lm_head: str | None = None) -> dict:
    """``{"from_pretrained": bool, "reason"?: str, "quantization_config"?: dict, "note"?: str}``
    for the HF model wrapped in ``model`` (module names start with ``root + "."``; ``lm_head``
    is the output projection's full name)."""
    lead = root + "."
    settings: dict[str, dict] = {}
    plain: list[str] = []
    for name, m in model.named_modules():
        if not name.startswith(lead):
            continue
        short = name.removeprefix(lead)
        if type(m).__name__ == "PackedLinear":
            return {
                "from_pretrained": False,
                "reason": f"{short} is a compress packed int4/int8 layer (rtn), which no "
                "transformers quantizer reads; load it with compress.variant.load_variant",
            }
        if type(m).__name__ == "CpuPacked4bitLinear":
            return {
                "from_pretrained": False,
                "reason": f"{short} is a 4-bit layer in bitsandbytes' packed AVX512-BF16 CPU "
                "layout, which transformers does not read; load it with "
                "compress.variant.load_variant, or quantize with cpu_kernel: plain",
            }
        if type(m).__name__ == "TorchaoInt8Linear":
            return {
                "from_pretrained": False,
                "reason": f"{short} is a torchao int8 layer (dynamic-int8), saved as plain codes "
                "and scales that transformers does not read; load it with "
                "compress.variant.load_variant",
            }
        if is_packed_linear(m):
            return {
                "from_pretrained": False,
                "reason": f"{short} is a torch dynamic int8 layer (dynamic-int8), which no "
                "transformers quantizer reads; load it with compress.variant.load_variant",
            }
        if (setting := _bnb_setting(m)) is not None:
            if name == lm_head:
                return {
                    "from_pretrained": False,
                    "reason": f"{short} (the LM head) is quantized; transformers' bitsandbytes "
                    "loader always keeps the LM head in float",
                }
            settings[short] = setting
        elif type(m) is nn.Linear:
            plain.append(short)
    if not settings:
        return {"from_pretrained": True}
    distinct = {json.dumps(s, sort_keys=True) for s in settings.values()}
    if len(distinct) > 1:
        return {
            "from_pretrained": False,
            "reason": "its bitsandbytes layers use different settings "
            f"({'; '.join(sorted(distinct))}); transformers has one quantization_config per model",
        }
    config = dict(next(iter(settings.values())))
    # Every linear layer left in float (the LM head, anything not targeted) stays so on load.
    config["llm_int8_skip_modules"] = [re.escape(n) for n in plain]
    out = {"from_pretrained": True, "quantization_config": config}
    if config.get("load_in_4bit"):
        out["note"] = FOUR_BIT_CPU_NOTE
    return out


def write_quantization_config(path: Path, config: dict) -> None:
    """Add ``quantization_config`` to the ``config.json`` in ``path`` (written, then renamed)."""
    file = Path(path) / "config.json"
    data = json.loads(file.read_text())
    data["quantization_config"] = config
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, file)
