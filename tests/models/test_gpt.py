from __future__ import annotations

import torch

from compress.models.gpt import GPT, GPTConfig, build_gpt, count_params


def test_small_preset_is_about_4m_parameters() -> None:
    n = count_params(build_gpt("small", 4096))
    assert 3.8e6 < n < 4.6e6, n


def test_logits_shape_and_tied_embeddings() -> None:
    model = build_gpt("tiny", 300)
    logits = model(torch.randint(0, 300, (3, 17)))
    assert logits.shape == (3, 17, 300)
    assert model.lm_head.weight is model.tok_emb.weight
    # Tied weights are counted once.
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert count_params(model) < sum(p.numel() for p in model.state_dict().values())


def test_attention_is_causal() -> None:
    torch.manual_seed(0)
    model = build_gpt("tiny", 100).eval()
    x = torch.randint(0, 100, (1, 20))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 100  # change only the future
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-6)
    assert not torch.allclose(a[0, 12:], b[0, 12:], atol=1e-3)


def test_too_long_input_is_rejected() -> None:
    model = GPT(
        GPTConfig(
            vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8, mlp_hidden=16, head_dim=8
        )
    )
    try:
        model(torch.zeros(1, 9, dtype=torch.long))
    except ValueError as exc:
        assert "block_size" in str(exc)
    else:
        raise AssertionError("expected a ValueError")


def test_generate_greedy_is_deterministic() -> None:
    torch.manual_seed(0)
    model = build_gpt("tiny", 64).eval()
    prompt = torch.tensor([[1, 2, 3]])
    a = model.generate(prompt, 10, temperature=0)
    b = model.generate(prompt, 10, temperature=0)
    assert a.shape == (1, 13) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
