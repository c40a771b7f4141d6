"""Tiny Hugging Face models for the tests: built with ``from_config``, trained briefly on the
tiny workspace's tokens so pruning and quantization have real structure to act on, saved with
``save_pretrained`` (weights, config and the workspace's tokenizer) and loaded back by path,
as a user's model directory would be."""

from __future__ import annotations

from pathlib import Path

import torch

from compress.data.tokenizer import EOS_TOKEN, Tokenizer
from compress.models.hf import HFCausalLM
from compress.train import TrainConfig, train

FAMILIES = ("gpt2", "opt", "llama")
CONTEXT = 128


def config(family: str, vocab: int):
    import transformers

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        return transformers.GPT2Config(
            n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4, **common
        )
    if family == "opt":
        return transformers.OPTConfig(
            max_position_embeddings=CONTEXT,
            hidden_size=64,
            word_embed_proj_dim=64,
            num_hidden_layers=2,
            ffn_dim=256,
            num_attention_heads=4,
            **common,
        )
    if family == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        return transformers.LlamaConfig(
            max_position_embeddings=CONTEXT,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    raise ValueError(family)


def hf_tokenizer(tokenizer: Tokenizer):
    import transformers

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend, eos_token=EOS_TOKEN
    )


def build_trained(family: str, tokenizer: Tokenizer, train_ids: torch.Tensor, steps: int = 150):
    """A tiny model of ``family``, trained ``steps`` steps on ``train_ids``."""
    from compress.models.hf import import_transformers

    transformers = import_transformers()
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config(family, tokenizer.vocab_size))
    cfg = TrainConfig(max_steps=steps, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=10)
    train(HFCausalLM(hf), train_ids, cfg, progress=False)  # Conv1D layers trained in place
    return hf.eval()


def save_model_dir(hf, tokenizer: Tokenizer, path: Path) -> Path:
    hf.save_pretrained(str(path))
    hf_tokenizer(tokenizer).save_pretrained(str(path))
    return path
