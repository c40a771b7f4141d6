"""The adapter of the built-in GPT (:mod:`compress.models.gpt`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from compress.errors import CompressError
from compress.models.adapter import (
    BlockLayout,
    ModelAdapter,
    ModelLayout,
    model_device,
    register_adapter,
)
from compress.models.gpt import GPT, GPTConfig

STUDENT_FIELDS = ("n_layer", "n_head", "n_embd", "head_dim", "mlp_hidden")


@register_adapter
class BuiltinGPTAdapter(ModelAdapter):
    family = "builtin"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, GPT)

    def describe(self, model: nn.Module) -> str:
        cfg = model.config
        return f"built-in GPT ({cfg.n_layer} layers, d={cfg.n_embd}, {cfg.n_head} heads)"

    def layout(self, model: nn.Module) -> ModelLayout:
        cfg: GPTConfig = model.config
        blocks = []
        for i in range(cfg.n_layer):
            p = f"blocks.{i}"
            blocks.append(
                BlockLayout(
                    index=i,
                    prefix=p,
                    q=f"{p}.attn.q_proj",
                    k=f"{p}.attn.k_proj",
                    v=f"{p}.attn.v_proj",
                    qkv=None,
                    o=f"{p}.attn.o_proj",
                    mlp_up=f"{p}.mlp.fc_in",
                    mlp_gate=None,
                    mlp_down=f"{p}.mlp.fc_out",
                    norms=(f"{p}.ln_1", f"{p}.ln_2"),
                    n_heads=cfg.n_head,
                    n_kv_heads=cfg.n_head,
                    head_dim=cfg.head_dim,
                    mlp_hidden=cfg.mlp_hidden,
                )
            )
        return ModelLayout(
            family=self.family,
            hidden=cfg.n_embd,
            vocab_size=cfg.vocab_size,
            blocks_path="blocks",
            blocks=tuple(blocks),
            embed="tok_emb",
            pos_embed="pos_emb",
            final_norm="ln_f",
            lm_head="lm_head",
            tied=model.lm_head.weight is model.tok_emb.weight,
            norm="layernorm",
        )

    def vocab_size(self, model: nn.Module) -> int:
        return model.config.vocab_size

    def max_seq_len(self, model: nn.Module) -> int:
        return model.config.block_size

    def sync_config(self, model: nn.Module) -> None:
        cfg: GPTConfig = model.config
        first = model.blocks[0]
        heads = first.attn.q_proj.out_features // cfg.head_dim
        model.config = dataclasses.replace(
            cfg,
            n_head=heads,
            mlp_hidden=first.mlp.fc_in.out_features,
            n_embd=model.tok_emb.weight.shape[1],
        )
        for block in model.blocks:
            block.attn.n_head = heads

    def student_fields(self) -> tuple[str, ...]:
        return STUDENT_FIELDS

    def student(self, model: nn.Module, sizes: dict[str, int], seed: int) -> nn.Module:
        bad = sorted(set(sizes) - set(STUDENT_FIELDS))
        if bad:
            raise CompressError(
                f"distill.student: {bad} are not sizes of the built-in GPT; "
                f"allowed: {', '.join(STUDENT_FIELDS)}"
            )
        base: GPTConfig = model.config
        overrides = dict(sizes)
        if "n_embd" in overrides and "head_dim" not in overrides:
            overrides["head_dim"] = overrides["n_embd"] // overrides.get("n_head", base.n_head)
        if "n_embd" in overrides and "mlp_hidden" not in overrides:
            overrides["mlp_hidden"] = 4 * overrides["n_embd"]
        torch.manual_seed(seed)
        return GPT(dataclasses.replace(base, **overrides)).to(model_device(model))

    def architecture(self, model: nn.Module, path: Path, tensors: dict[str, torch.Tensor]) -> dict:
        return {"family": self.family, "config": model.config.to_dict()}

    def skeleton(self, arch: dict, path: Path) -> nn.Module:
        # Built on the CPU, not on "meta": meta tensors pull in ~80 MB of torch modules on first
        # use, which would count against the variant's measured load memory.
        return GPT(GPTConfig.from_dict(arch["config"]), init_weights=False)

    def finish_load(self, model: nn.Module, arch: dict, quantized: dict) -> set[str]:
        if "lm_head" in quantized:
            return set()
        model.lm_head.weight = model.tok_emb.weight  # re-tie (saved once)
        return {"lm_head.weight"}
