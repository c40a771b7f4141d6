"""Hugging Face causal language models: loading, the families' adapters, the saved form.

A model comes from ``AutoModelForCausalLM.from_pretrained`` (a local directory written by
``save_pretrained``, or a hub id when a network is there) and is wrapped in
:class:`HFCausalLM`, whose call maps token ids to logits (``use_cache=False``: no KV cache is
built) like every model in compress. GPT-2's ``Conv1D`` layers (a linear layer with its weight
stored transposed) become ``nn.Linear`` at load, so every stage that works on linear layers
sees them; the saved form transposes them back.

Families with a layout: GPT-2 (fused ``c_attn``), OPT, and the Llama family (Llama, Mistral,
Qwen2: grouped-query attention, RMSNorm, rotary positions, SwiGLU MLP). Any other causal LM
loads and works with the stages that only need its linear layers.

A saved HF variant is a directory that ``AutoModelForCausalLM.from_pretrained`` reads:
``config.json`` plus ``model.safetensors`` under the model's own names, next to compress's
``variant.json`` manifest. transformers is imported only here, and only when needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from compress.cache import cache_dir, read_entry, write_entry
from compress.errors import CompressError
from compress.models.adapter import (
    BlockLayout,
    LayoutError,
    ModelAdapter,
    ModelLayout,
    model_device,
    register_adapter,
)

log = logging.getLogger(__name__)

PREFIX = "hf"  # the wrapped model's attribute: module names start with "hf."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def import_transformers() -> Any:
    try:
        import transformers
    except ModuleNotFoundError:
        raise CompressError("model.hf needs transformers: pip install 'compress[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # per-load bars; compress prints its own lines
    return transformers


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM whose call maps ids ``(B, T)`` to logits ``(B, T, V)``.

    ``conv1d`` names the layers that were ``Conv1D`` in the original (relative to this module).
    """

    def __init__(self, hf: nn.Module, conv1d: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.hf = hf
        self.conv1d = tuple(conv1d)

    @property
    def config(self) -> Any:
        return self.hf.config

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids, use_cache=False).logits  # (B, T, V)


# ---------------------------------------------------------------------------------------------
# Loading


def conv1d_to_linear(model: nn.Module, prefix: str = "") -> tuple[str, ...]:
    """Replace every transformers ``Conv1D`` in ``model`` by the equivalent ``nn.Linear``
    (weight transposed to (out, in)); returns their names, each prefixed with ``prefix``."""
    from transformers.pytorch_utils import Conv1D

    from compress.compressors.targets import set_module

    names = []
    for name, m in list(model.named_modules()):
        if isinstance(m, Conv1D):
            lin = nn.Linear(
                m.nx, m.nf, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype
            )
            with torch.no_grad():
                lin.weight.copy_(m.weight.t())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            lin.weight.requires_grad_(m.weight.requires_grad)
            set_module(model, name, lin.train(m.training))
            names.append(prefix + name)
    return tuple(names)


def _empty_linears(model: nn.Module, names: tuple[str, ...]) -> None:
    """Swap the ``Conv1D`` layers of a freshly built skeleton for uninitialised ``nn.Linear``."""
    from compress.compressors.targets import set_module

    for name in names:
        m = model.get_submodule(name)
        set_module(
            model, name, nn.Linear(m.nx, m.nf, bias=m.bias is not None, dtype=m.weight.dtype)
        )


def local_dir(name: str, base_dir: Path) -> Path | None:
    """``name`` as an existing directory (absolute, ``~``, or relative to ``base_dir``)."""
    p = Path(os.path.expanduser(name))
    candidates = [p] if p.is_absolute() else [base_dir / p, Path.cwd() / p]
    return next((c.resolve() for c in candidates if c.is_dir()), None)


def dir_fingerprint(path: Path) -> str:
    """sha256 over every file's relative path and bytes; remembered per (path, size, mtime)
    so a large checkpoint is hashed once."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and ".cache" not in f.parts)
    stat_key = hashlib.sha256(
        json.dumps(
            [str(path)]
            + [
                [f.relative_to(path).as_posix(), f.stat().st_size, f.stat().st_mtime_ns]
                for f in files
            ]
        ).encode()
    ).hexdigest()
    memo = cache_dir() / "fingerprints" / f"{stat_key}.txt"
    remembered = read_entry(memo, "remembered fingerprint")
    if remembered is not None:
        return remembered.decode().strip()
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")
    digest = h.hexdigest()[:24]
    write_entry(memo, digest.encode())
    return digest


def load_pretrained(
    name: str,
    base_dir: Path,
    revision: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> tuple[HFCausalLM, dict]:
    """The model ``name`` (a directory, or a hub id) as an :class:`HFCausalLM` on the CPU, and
    where it came from: ``{"source", "local", "revision", "fingerprint"}``."""
    transformers = import_transformers()
    local = local_dir(name, base_dir)
    source = str(local) if local else name
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[dtype],
        "trust_remote_code": trust_remote_code,
    }
    if local:
        kwargs["local_files_only"] = True
    elif revision:
        kwargs["revision"] = revision
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        where = "directory" if local else "Hugging Face Hub model (is there a network?)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressError(f"model.hf: cannot load {where} {source!r}: {first}") from None
    conv = conv1d_to_linear(hf, prefix=f"{PREFIX}.")
    model = HFCausalLM(hf, conv).eval()
    if local:
        fingerprint = dir_fingerprint(local)
        rev = None
    else:
        rev = getattr(hf.config, "_commit_hash", None) or revision or "main"
        fingerprint = f"{name}@{rev}"
    info = {"source": source, "local": bool(local), "revision": rev, "fingerprint": fingerprint}
    return model, info


def load_tokenizer(source: str, local: bool, revision: str | None, trust_remote_code: bool):
    """The model's own tokenizer as a :class:`compress.data.Tokenizer` (fast tokenizers only)."""
    from compress.data.tokenizer import Tokenizer

    transformers = import_transformers()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if local:
        kwargs["local_files_only"] = True
    elif revision:
        kwargs["revision"] = revision
    try:
        tok = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressError(f"model.hf: cannot load the tokenizer of {source!r}: {first}") from None
    if not getattr(tok, "is_fast", False):
        raise CompressError(
            f"model.hf: {source!r} has no fast (Rust `tokenizers`) tokenizer, which compress needs"
        )
    return Tokenizer(tok.backend_tokenizer, eos_token=tok.eos_token)


# ---------------------------------------------------------------------------------------------
# Families


class HFAdapter(ModelAdapter):
    """What every Hugging Face family shares: the saved form, vocabulary, context length."""

    family: ClassVar[str] = "hf"
    model_types: ClassVar[tuple[str, ...]] = ()
    student_keys: ClassVar[tuple[str, ...]] = ()

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, HFCausalLM) and model.config.model_type in self.model_types

    def describe(self, model: nn.Module) -> str:
        cfg = model.config
        return f"{type(model.hf).__name__} ({cfg.model_type})"

    def vocab_size(self, model: nn.Module) -> int:
        return int(model.config.vocab_size)

    def lm_head(self, model: nn.Module) -> str | None:
        head = model.hf.get_output_embeddings()
        return next((n for n, m in model.named_modules() if m is head), None)

    def max_seq_len(self, model: nn.Module) -> int | None:
        cfg = model.config
        for key in ("n_positions", "max_position_embeddings"):
            n = getattr(cfg, key, None)
            if isinstance(n, int) and n > 0:
                return n
        return None

    def student_fields(self) -> tuple[str, ...]:
        return self.student_keys

    def structured_refusal(self, model: nn.Module, part: str) -> str | None:
        if part == "residual":
            return (
                f"{model.config.model_type}: residual (hidden size) pruning is not supported for "
                "Hugging Face models; prune heads and MLP channels (ratio) instead"
            )
        return None

    def student(self, model: nn.Module, sizes: dict[str, int], seed: int) -> nn.Module:
        if not self.student_keys:
            return super().student(model, sizes, seed)
        bad = sorted(set(sizes) - set(self.student_keys))
        if bad:
            raise CompressError(
                f"distill.student: {bad} are not sizes of a {model.config.model_type} model; "
                f"allowed: {', '.join(self.student_keys)}"
            )
        transformers = import_transformers()
        config = model.config.__class__.from_dict({**model.config.to_dict(), **sizes})
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=model.hf.dtype)
        conv = conv1d_to_linear(hf, prefix=f"{PREFIX}.")
        return HFCausalLM(hf, conv).eval().to(model_device(model))

    # -- saved form ---------------------------------------------------------------------------

    def architecture(self, model: nn.Module, path: Path, tensors: dict[str, torch.Tensor]) -> dict:
        lead = f"{PREFIX}."
        for key in list(tensors):
            t = tensors.pop(key)
            module = key.rsplit(".", 1)[0]
            if module in model.conv1d and key.endswith(".weight") and t.is_floating_point():
                t = t.t().contiguous()  # back to Conv1D's (in, out)
            tensors[key.removeprefix(lead)] = t
        model.config.save_pretrained(str(path))
        return {
            "family": self.family,
            "model_type": model.config.model_type,
            "conv1d": list(model.conv1d),
            "trust_remote_code": bool(getattr(model.config, "auto_map", None)),
        }

    def transformers_export(self, model: nn.Module, path: Path) -> dict | None:
        from compress.models.hf_export import export_status, write_quantization_config

        status = export_status(model, PREFIX, self.lm_head(model))
        if "quantization_config" in status:
            write_quantization_config(path, status["quantization_config"])
        return status

    def skeleton(self, arch: dict, path: Path) -> nn.Module:
        transformers = import_transformers()
        from transformers.initialization import no_init_weights

        trust = bool(arch.get("trust_remote_code"))
        config = transformers.AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust
        )
        # The float skeleton; compress.variant swaps in the quantized layers the manifest lists.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with no_init_weights():
            hf = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
        lead = f"{PREFIX}."
        conv = tuple(arch.get("conv1d", ()))
        _empty_linears(hf, tuple(n.removeprefix(lead) for n in conv))
        return HFCausalLM(hf, conv).eval()

    def load_tensors(self, arch: dict, tensors: dict[str, torch.Tensor]) -> dict:
        conv = set(arch.get("conv1d", ()))
        out = {}
        for key, t in tensors.items():
            full = f"{PREFIX}.{key}"
            if full.rsplit(".", 1)[0] in conv and key.endswith(".weight") and t.is_floating_point():
                t = t.t().contiguous()
            out[full] = t
        return out

    def finish_load(self, model: nn.Module, arch: dict, quantized: dict) -> set[str]:
        head = f"{PREFIX}.lm_head"
        if getattr(model.config, "tie_word_embeddings", False) and head not in quantized:
            model.hf.lm_head.weight = model.hf.get_input_embeddings().weight
            return {f"{head}.weight"}
        return set()


def _cfg(model: nn.Module, *keys: str) -> Any:
    cfg = model.config
    for k in keys:
        v = getattr(cfg, k, None)
        if v is not None:
            return v
    raise LayoutError(f"{cfg.model_type}: config has none of {keys}")


@register_adapter
class GPT2Adapter(HFAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    student_keys = ("n_layer", "n_head", "n_embd", "n_inner")

    def layout(self, model: nn.Module) -> ModelLayout:
        cfg = model.config
        heads = cfg.n_head
        blocks = []
        for i in range(cfg.n_layer):
            p = f"{PREFIX}.transformer.h.{i}"
            blocks.append(
                BlockLayout(
                    index=i,
                    prefix=p,
                    q=None,
                    k=None,
                    v=None,
                    qkv=f"{p}.attn.c_attn",
                    o=f"{p}.attn.c_proj",
                    mlp_up=f"{p}.mlp.c_fc",
                    mlp_gate=None,
                    mlp_down=f"{p}.mlp.c_proj",
                    norms=(f"{p}.ln_1", f"{p}.ln_2"),
                    n_heads=heads,
                    n_kv_heads=heads,
                    head_dim=cfg.n_embd // heads,
                    mlp_hidden=cfg.n_inner or 4 * cfg.n_embd,
                )
            )
        return ModelLayout(
            family=self.family,
            hidden=cfg.n_embd,
            vocab_size=cfg.vocab_size,
            blocks_path=f"{PREFIX}.transformer.h",
            blocks=tuple(blocks),
            embed=f"{PREFIX}.transformer.wte",
            pos_embed=f"{PREFIX}.transformer.wpe",
            final_norm=f"{PREFIX}.transformer.ln_f",
            lm_head=f"{PREFIX}.lm_head",
            tied=model.hf.lm_head.weight is model.hf.transformer.wte.weight,
            norm="layernorm",
        )

    def structured_refusal(self, model: nn.Module, part: str) -> str | None:
        if part == "heads":
            return (
                f"{model.config.model_type}: its config derives the head width from the hidden "
                "size (head_dim = hidden / heads), so fewer heads of the same width cannot be "
                "described and the pruned model would not reload; set prune_heads: false to "
                "prune MLP channels only"
            )
        return super().structured_refusal(model, part)

    def sync_config(self, model: nn.Module) -> None:
        block = model.hf.transformer.h[0]
        model.config.n_inner = block.mlp.c_fc.out_features
        model.config.n_embd = model.hf.transformer.wte.weight.shape[1]


@register_adapter
class OPTAdapter(HFAdapter):
    family = "opt"
    model_types = ("opt",)
    student_keys = ("num_hidden_layers", "num_attention_heads", "hidden_size", "ffn_dim")

    def layout(self, model: nn.Module) -> ModelLayout:
        cfg = model.config
        dec = model.hf.model.decoder
        if dec.project_in is not None or dec.final_layer_norm is None:
            raise LayoutError(
                "opt: models with word_embed_proj_dim != hidden_size or post-norm blocks "
                "(e.g. opt-350m) have no supported layout"
            )
        heads = cfg.num_attention_heads
        blocks = []
        for i in range(cfg.num_hidden_layers):
            p = f"{PREFIX}.model.decoder.layers.{i}"
            a = f"{p}.self_attn"
            blocks.append(
                BlockLayout(
                    index=i,
                    prefix=p,
                    q=f"{a}.q_proj",
                    k=f"{a}.k_proj",
                    v=f"{a}.v_proj",
                    qkv=None,
                    o=f"{a}.out_proj",
                    mlp_up=f"{p}.fc1",
                    mlp_gate=None,
                    mlp_down=f"{p}.fc2",
                    norms=(f"{p}.self_attn_layer_norm", f"{p}.final_layer_norm"),
                    n_heads=heads,
                    n_kv_heads=heads,
                    head_dim=cfg.hidden_size // heads,
                    mlp_hidden=cfg.ffn_dim,
                )
            )
        return ModelLayout(
            family=self.family,
            hidden=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            blocks_path=f"{PREFIX}.model.decoder.layers",
            blocks=tuple(blocks),
            embed=f"{PREFIX}.model.decoder.embed_tokens",
            pos_embed=f"{PREFIX}.model.decoder.embed_positions",
            final_norm=f"{PREFIX}.model.decoder.final_layer_norm",
            lm_head=f"{PREFIX}.lm_head",
            tied=model.hf.lm_head.weight is dec.embed_tokens.weight,
            norm="layernorm",
        )

    def structured_refusal(self, model: nn.Module, part: str) -> str | None:
        if part == "heads":
            return (
                f"{model.config.model_type}: its config derives the head width from the hidden "
                "size (head_dim = hidden / heads), so fewer heads of the same width cannot be "
                "described and the pruned model would not reload; set prune_heads: false to "
                "prune MLP channels only"
            )
        return super().structured_refusal(model, part)

    def sync_config(self, model: nn.Module) -> None:
        layer = model.hf.model.decoder.layers[0]
        model.config.ffn_dim = layer.fc1.out_features


@register_adapter
class LlamaAdapter(HFAdapter):
    """Llama, Mistral and Qwen2: the same block (GQA attention, RMSNorm, SwiGLU MLP)."""

    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    student_keys = (
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "intermediate_size",
        "head_dim",
    )

    def head_dim(self, model: nn.Module) -> int:
        cfg = model.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def layout(self, model: nn.Module) -> ModelLayout:
        cfg = model.config
        hd = self.head_dim(model)
        blocks = []
        for i in range(cfg.num_hidden_layers):
            p = f"{PREFIX}.model.layers.{i}"
            a, m = f"{p}.self_attn", f"{p}.mlp"
            blocks.append(
                BlockLayout(
                    index=i,
                    prefix=p,
                    q=f"{a}.q_proj",
                    k=f"{a}.k_proj",
                    v=f"{a}.v_proj",
                    qkv=None,
                    o=f"{a}.o_proj",
                    mlp_up=f"{m}.up_proj",
                    mlp_gate=f"{m}.gate_proj",
                    mlp_down=f"{m}.down_proj",
                    norms=(f"{p}.input_layernorm", f"{p}.post_attention_layernorm"),
                    n_heads=cfg.num_attention_heads,
                    n_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
                    head_dim=hd,
                    mlp_hidden=cfg.intermediate_size,
                )
            )
        return ModelLayout(
            family=self.family,
            hidden=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            blocks_path=f"{PREFIX}.model.layers",
            blocks=tuple(blocks),
            embed=f"{PREFIX}.model.embed_tokens",
            pos_embed=None,
            final_norm=f"{PREFIX}.model.norm",
            lm_head=f"{PREFIX}.lm_head",
            tied=model.hf.lm_head.weight is model.hf.model.embed_tokens.weight,
            norm="rmsnorm",
        )

    def sync_config(self, model: nn.Module) -> None:
        cfg = model.config
        hd = self.head_dim(model)
        layer = model.hf.model.layers[0]
        heads = layer.self_attn.q_proj.out_features // hd
        kv = layer.self_attn.k_proj.out_features // hd
        cfg.head_dim = hd
        cfg.num_attention_heads = heads
        cfg.num_key_value_heads = kv
        cfg.intermediate_size = layer.mlp.up_proj.out_features
        for layer in model.hf.model.layers:
            attn = layer.self_attn
            attn.num_key_value_groups = heads // kv
            attn.head_dim = hd


@register_adapter
class GenericHFAdapter(HFAdapter):
    """Any other causal LM: linear-layer stages work; layout-dependent stages refuse."""

    family = "hf-generic"
    has_layout = False

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, HFCausalLM)

    def layout(self, model: nn.Module) -> ModelLayout:
        raise LayoutError(
            f"{self.describe(model)}: model type {model.config.model_type!r} has no known block "
            "layout (supported: gpt2, opt, llama, mistral, qwen2); stages that only need its "
            "linear layers (int8, nf4, fp4, dynamic-int8, prune) still work"
        )

    def sync_config(self, model: nn.Module) -> None:
        self.layout(model)
