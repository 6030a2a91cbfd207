"""Sampling: shapes and masks, EOS handling, seeds, and log-probs that the trainers can recompute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from training.core.generation import TransformersGenerator
from training.core.modeling import load_causal_lm, load_tokenizer, sequence_logprobs

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me a story about a small robot, please."}],
]


@pytest.fixture
def generator(tiny_model_dir: Path) -> TransformersGenerator:
    model = load_causal_lm(tiny_model_dir, device="cpu")
    return TransformersGenerator(model, load_tokenizer(tiny_model_dir), batch_size=2)


def favour_eos(generator: TransformersGenerator, bonus: float) -> Any:
    """Raise the EOS logit so that random tiny models actually stop sometimes."""
    eos = generator.tokenizer.eos_token_id

    def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[..., eos] += bonus
        return output

    return generator.model.lm_head.register_forward_hook(hook)  # type: ignore[union-attr]


def test_shapes_masks_and_eos(generator: TransformersGenerator) -> None:
    handle = favour_eos(generator, 4.0)
    out = generator.generate(PROMPTS, n=3, max_new_tokens=10, temperature=1.0, seed=0)
    handle.remove()
    n = len(PROMPTS) * 3
    assert out.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert out.completion_ids.shape[0] == n
    assert out.prompt_ids.shape == out.prompt_mask.shape
    assert out.prompt_mask[:, -1].all()  # left padded
    assert len(out.texts) == n
    eos, pad = generator.tokenizer.eos_token_id, generator.tokenizer.pad_token_id
    assert out.ended_with_eos.any()
    assert not out.ended_with_eos.all()
    for row in range(n):
        mask = out.completion_mask[row].bool()
        length = int(mask.sum())
        assert mask[:length].all()
        assert not mask[length:].any()
        ids = out.completion_ids[row]
        assert (ids[length:] == pad).all()
        if out.ended_with_eos[row]:
            assert int(ids[length - 1]) == eos
            assert eos not in ids[: length - 1].tolist()
        else:
            assert length == 10
        assert (out.logprobs[row][~mask] == 0).all()
        assert (out.logprobs[row][mask] < 0).all()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.9, 20, 0.9)]
)
def test_sampling_logprobs_match_a_fresh_forward(
    generator: TransformersGenerator, temperature: float, top_k: int, top_p: float
) -> None:
    """What PPO stores at sampling time must equal what it recomputes: temperature-scaled,
    before top-k/top-p filtering, with left-padded prompts (checklist items 3 and 10)."""
    out = generator.generate(
        PROMPTS, n=2, max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p, seed=1
    )
    with torch.no_grad():
        _, per_token = sequence_logprobs(
            generator.model,
            out.input_ids,
            out.attention_mask,
            out.full_completion_mask,
            temperature=temperature,
        )
    recomputed = per_token[:, out.prompt_ids.shape[1] - 1 :]  # (N, C)
    torch.testing.assert_close(recomputed, out.logprobs, atol=2e-4, rtol=1e-4)


def test_seed_makes_sampling_reproducible(generator: TransformersGenerator) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    a = generator.generate(PROMPTS, n=2, max_new_tokens=6, seed=7)
    b = generator.generate(PROMPTS, n=2, max_new_tokens=6, seed=7)
    c = generator.generate(PROMPTS, n=2, max_new_tokens=6, seed=8)
    assert a.texts == b.texts
    assert a.texts != c.texts
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is left alone


def test_greedy_is_the_argmax_continuation(generator: TransformersGenerator) -> None:
    out = generator.generate(PROMPTS[:1], n=1, max_new_tokens=5, temperature=0.0)
    ids = out.prompt_ids[:, out.prompt_mask[0].bool()]
    model = generator.model
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat(
                [ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1
            )
    assert out.completion_ids[0, :5].tolist() == ids[0, -5:].tolist()


def test_fixed_length_samples_ignore_eos(tiny_model_dir: Path) -> None:
    generator = TransformersGenerator(
        load_causal_lm(tiny_model_dir, device="cpu"),
        load_tokenizer(tiny_model_dir),
        stop_at_eos=False,
    )
    handle = favour_eos(generator, 6.0)
    out = generator.generate(PROMPTS, n=1, max_new_tokens=7, seed=0)
    handle.remove()
    assert out.completion_mask.all()
    assert out.completion_ids.shape[1] == 7
    assert not out.ended_with_eos.any()
