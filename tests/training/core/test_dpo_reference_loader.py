"""A reference given as a loader is in memory only while it is used.

``dpo.run`` passes the reference as a function that loads it: it is loaded for the one
reference pass, freed for the whole of training (the policy, its gradients and AdamW's two
moments are the peak; a reference would add a fourth copy of the weights) and loaded again
only for the end-of-run KL estimate. Held-out pairs: the figures match those of a run given
the reference model itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from torch import nn

from tests.training.core.test_dpo import HELD_OUT, TRAIN, config
from training.core import dpo
from training.core.dpo import Reference, train_dpo
from training.core.modeling import load_causal_lm, load_tokenizer


def run(tmp_path: Path, model_dir: Path, reference: Any, **overrides: Any) -> dict[str, float]:
    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "right"
    cfg = config(tmp_path, model_dir, max_steps=4, learning_rate=1e-4, **overrides)
    policy = load_causal_lm(model_dir, device="cpu")
    return train_dpo(cfg, TRAIN, policy, reference, tokenizer, eval_pairs=HELD_OUT)


@pytest.mark.parametrize("kl_samples", [0, 2])
def test_loader_reference_is_freed_for_training(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kl_samples: int
) -> None:
    loads: list[nn.Module] = []

    def loader() -> nn.Module:
        loads.append(load_causal_lm(tiny_model_dir, device="cpu"))
        return loads[-1]

    held_during_training: list[bool] = []
    forward = dpo.pair_forward

    def spy(policy: Any, batch: Any, cfg: Any, ref: Any, reference: Any = None) -> Any:
        if policy.training:  # a training step, not the final evaluation
            held_during_training.append(any(r is not None for r in live_models()))
        return forward(policy, batch, cfg, ref, reference)

    created: list[Reference] = []
    init = Reference.__init__

    def track(self: Reference, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        created.append(self)

    def live_models() -> list[Any]:
        return [r.model for r in created]

    monkeypatch.setattr(dpo, "pair_forward", spy)
    monkeypatch.setattr(Reference, "__init__", track)
    with_loader = run(tmp_path / "loader", tiny_model_dir, loader, kl_samples=kl_samples)
    assert held_during_training
    assert not any(held_during_training)
    assert len(loads) == (2 if kl_samples else 1)

    monkeypatch.setattr(dpo, "pair_forward", forward)
    with_model = run(
        tmp_path / "model",
        tiny_model_dir,
        load_causal_lm(tiny_model_dir, device="cpu"),
        kl_samples=kl_samples,
    )
    for key in ("eval_loss", "eval_reward_margin", "train_loss"):
        assert with_loader[key] == pytest.approx(with_model[key], abs=1e-6)
