"""Saving and loading a (possibly compressed) model: safetensors weights plus a JSON manifest.

A saved variant is a folder with ``model.safetensors`` (every tensor of the state dict, tied
weights once; quantized layers as their packed codes and scales; torch's dynamically quantized
layers and compress's packed int4/int8 layers as plain codes, scales, zero points and bias) and
``variant.json`` (the model config and, for each converted module, how it was quantized). A
Hugging Face model that transformers cannot load (torch dynamic int8, packed rtn layers) keeps
its weights in ``compress.safetensors`` instead, so that ``from_pretrained`` refuses the folder
rather than reading int8 codes into float layers.
Loading rebuilds the architecture from the config, swaps in empty quantized shells and fills
them from the file: nothing is unpickled and no code is executed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from compress.compile import compile_model, is_compiled
from compress.compressors import int8_torchao
from compress.compressors.dynamic_int8 import KIND as DYNAMIC_INT8
from compress.compressors.dynamic_int8 import TORCH_AO, TORCHAO, linear_from_tensors
from compress.compressors.packed import KIND as PACKED
from compress.compressors.packed import PackedLinear, PackedSpec, from_plain
from compress.compressors.quantize import DTYPES, keep_plain_layout
from compress.compressors.targets import set_module
from compress.errors import CompressError
from compress.evaluate.memory import is_packed_linear, packed_linear_tensors, stored_tensors
from compress.models.adapter import adapter_by_family, adapter_for

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
WEIGHTS = "model.safetensors"
OPAQUE_WEIGHTS = "compress.safetensors"  # an HF variant transformers cannot load (see save)
MANIFEST = "variant.json"
BNB_KINDS = ("int8", "nf4", "fp4")  # manifest kinds stored as bitsandbytes layers
CPU_PACKED = "avx512bf16"  # a 4-bit layer's layout: bitsandbytes' packed CPU kernel's (bnb_cpu)


def quantized_modules(model: nn.Module) -> dict[str, dict]:
    """Manifest entries for the quantized (bitsandbytes, torch dynamic int8, packed) layers."""
    out: dict[str, dict] = {}
    for name, m in model.named_modules():
        kind = type(m).__name__
        if isinstance(m, PackedLinear):
            out[name] = {"kind": PACKED, **m.spec.to_dict()}
        elif isinstance(m, int8_torchao.TorchaoInt8Linear):
            out[name] = {
                "kind": DYNAMIC_INT8,
                "per_channel": m.per_channel,
                "backend": TORCHAO,
                "compile": is_compiled(model),
            }
        elif is_packed_linear(m):
            tensors = packed_linear_tensors(m)
            if tensors["weight"].dtype != torch.int8:
                raise CompressError(f"{name}: only int8 dynamic quantization can be saved")
            out[name] = {
                "kind": DYNAMIC_INT8,
                "per_channel": tensors["weight_scale"].dim() == 1,
                "backend": TORCH_AO,
            }
        elif kind == "Linear8bitLt":
            out[name] = {"kind": "int8", "threshold": float(m.state.threshold)}
        elif kind == "CpuPacked4bitLinear":
            qs = m.weight.quant_state
            out[name] = {
                "kind": qs.quant_type,
                "compute_dtype": str(m.compute_dtype).removeprefix("torch."),
                "blocksize": qs.blocksize,
                "double_quant": False,  # the layout holds bf16 absmax
                "layout": CPU_PACKED,
            }
        elif kind == "Linear4bit":
            qs = m.weight.quant_state
            out[name] = {
                "kind": qs.quant_type,
                "compute_dtype": str(m.compute_dtype).removeprefix("torch."),
                "blocksize": qs.blocksize,
                "double_quant": qs.nested,
            }
    return out


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared tensor under its first name only (safetensors needs that)."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in stored_tensors(model).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_variant(model: nn.Module, path: Path, extra: dict | None = None) -> Path:
    """Write ``model`` to the folder ``path``: weights (safetensors) and the manifest. An HF
    model's folder is also a Hugging Face directory (``config.json``, ``model.safetensors``);
    the manifest's ``transformers`` entry says whether ``from_pretrained`` can load it (see
    :mod:`compress.models.hf_export`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = _unique_state_dict(model)
    quantized = quantized_modules(model)
    adapter = adapter_for(model)
    arch = adapter.architecture(model, path, tensors)
    manifest = {
        "format_version": FORMAT_VERSION,
        "architecture": arch,
        "quantized": quantized,
        "extra": extra or {},
    }
    weights = WEIGHTS
    if (hf := adapter.transformers_export(model, path)) is not None:
        manifest["transformers"] = hf
        if not hf["from_pretrained"]:
            # from_pretrained would load these codes into float layers with a mere warning:
            # under another name, it refuses the folder instead.
            weights = manifest["weights"] = OPAQUE_WEIGHTS
    save_file(tensors, str(path / weights), metadata={"format": "pt"})
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path


def _shell(spec: dict, in_features: int, out_features: int, bias: bool) -> nn.Module:
    from compress._bnb import import_bnb

    bnb = import_bnb()
    if spec["kind"] == "int8":
        return bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=bias,
            has_fp16_weights=False,
            threshold=spec["threshold"],
            device="meta",
        )
    shell = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=DTYPES[spec["compute_dtype"]],
        compress_statistics=spec["double_quant"],
        quant_type=spec["kind"],
        device="meta",
    )
    keep_plain_layout(shell)  # the same CPU kernel as the layer that was saved
    return shell


def _fill(module: nn.Module, spec: dict, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    from compress._bnb import import_bnb

    bnb = import_bnb()
    own = {k[len(prefix) :]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
    if spec["kind"] == "int8":
        w = own["weight"]
        module.weight = bnb.nn.Int8Params(
            w, requires_grad=False, has_fp16_weights=False, CB=w, SCB=own["SCB"]
        )
    else:
        stats = {k[len("weight.") :]: v for k, v in own.items() if k.startswith("weight.")}
        module.weight = bnb.nn.Params4bit.from_prequantized(
            data=own["weight"], quantized_stats=stats, requires_grad=False, device="cpu"
        )
    if "bias" in own:
        module.bias = nn.Parameter(own["bias"], requires_grad=False)


def _architecture(manifest: dict) -> dict:
    arch = manifest.get("architecture")
    if arch == "compress.GPT":  # format_version 1: the built-in GPT, config beside it
        return {"family": "builtin", "config": manifest["config"]}
    if not isinstance(arch, dict) or "family" not in arch:
        raise CompressError(f"unknown architecture {arch!r}")
    return arch


def _dynamic_int8_layer(spec: dict, own: dict[str, torch.Tensor], name: str) -> nn.Module:
    """A saved dynamic-int8 layer rebuilt on its backend, or on torch.ao where the layer was
    made by torchao but torchao is missing (same codes and scales; activations are then
    quantized the torch.ao way, so outputs differ slightly)."""
    if spec.get("backend", TORCH_AO) == TORCH_AO:
        return linear_from_tensors(**own)
    if int8_torchao.import_torchao() is not None:
        return int8_torchao.linear_from_tensors(**own)
    log.warning("%s: saved with torchao, which is missing; loading it on torch.ao", name)
    per_channel = spec.get("per_channel", True)
    scale, zero = own["weight_scale"].float(), own["weight_zero_point"].to(torch.int32)
    own["weight_scale"] = scale.reshape(-1) if per_channel else scale.reshape(())
    own["weight_zero_point"] = zero.reshape(-1) if per_channel else zero.reshape(())
    return linear_from_tensors(**own)


def load_variant(path: Path | str, compile: bool = True) -> nn.Module:
    """The model saved in ``path`` by :func:`save_variant`, on the CPU, in eval mode.

    A model that was compiled when it was saved (``dynamic-int8`` on torchao) is compiled
    again, at its first call, unless ``compile`` is false.
    Nothing is unpickled and no code is executed (unless the saved model's family itself
    needs ``trust_remote_code``, recorded when it was loaded with it)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CompressError(f"{path}: not a saved variant (no {MANIFEST})") from None
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CompressError(
            f"{path / MANIFEST}: format_version {manifest.get('format_version')!r}, "
            f"this version of compress reads {', '.join(map(str, READABLE_VERSIONS))}"
        )
    try:
        arch = _architecture(manifest)
    except CompressError as exc:
        raise CompressError(f"{path / MANIFEST}: {exc}") from None
    adapter = adapter_by_family(arch["family"])
    model = adapter.skeleton(arch, path)
    weights = path / manifest.get("weights", WEIGHTS)
    tensors = adapter.load_tensors(arch, load_file(str(weights)))
    # Quantized layers first: they take their tensors out of ``tensors``. Layers packed for a
    # kernel (torch's dynamic int8, compress's packed int4/int8) go in after
    # ``load_state_dict``, which cannot fill them: they are repacked from their plain tensors.
    quantized = manifest["quantized"]
    dynamic: dict[str, nn.Module] = {}
    for name, spec in quantized.items():
        if spec["kind"] in (DYNAMIC_INT8, PACKED):
            prefix = name + "."
            own = {k[len(prefix) :]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
            if spec["kind"] == DYNAMIC_INT8:
                dynamic[name] = _dynamic_int8_layer(spec, own, name)
            else:
                settings = {k: v for k, v in spec.items() if k != "kind"}
                dynamic[name] = from_plain(own, PackedSpec(**settings))
            continue
        if spec.get("layout") == CPU_PACKED:
            from compress.compressors import bnb_cpu

            prefix = name + "."
            own = {k[len(prefix) :]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
            layer = bnb_cpu.from_tensors(
                own, spec["kind"], spec["blocksize"], DTYPES[spec["compute_dtype"]]
            )
            set_module(model, name, layer)
            continue
        old = model.get_submodule(name)
        shell = _shell(spec, old.in_features, old.out_features, old.bias is not None)
        _fill(shell, spec, name + ".", tensors)
        set_module(model, name, shell)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    for name, layer in dynamic.items():
        set_module(model, name, layer)
    tied = adapter.finish_load(model, arch, quantized)
    filled = tuple(name + "." for name in quantized)
    missing = [k for k in result.missing_keys if not k.startswith(filled) and k not in tied]
    if missing or result.unexpected_keys:
        raise CompressError(
            f"{weights}: does not match its manifest: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if compile and any(spec.get("compile") for spec in quantized.values()):
        compile_model(model)
    return model.eval()
