"""Our sigmoid DPO and IPO against TRL 1.16's DPOTrainer on the same batch and tiny models.

TRL is a dev-only oracle (training-stack.md section 6): the batch comes from TRL's own
tokenisation and collator, TRL's loss from ``DPOTrainer.compute_loss`` (its chunked log-prob
path and its loss code), ours from ``sequence_logprobs`` + ``preference_loss`` on the same
tensors. The reference is a differently seeded model so that the log-ratios are not zero.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from training.core.losses import PairLogps, PreferenceHyper, preference_loss
from training.core.modeling import (
    build_tiny_causal_lm,
    load_causal_lm,
    load_tokenizer,
    sequence_logprobs,
)

pytest.importorskip("trl")

# TRL's config and peft still use transformers' deprecated gradient_checkpointing names.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*is deprecated and will be removed in v6.*:FutureWarning"
)

ROWS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green and wide."},
    {
        "prompt": "What is the capital of France?",
        "chosen": " Paris.",
        "rejected": " I am fine, thank you.",
    },
    {"prompt": "Once upon a time", "chosen": " there was a robot.", "rejected": " no."},
    {"prompt": "Write a poem.", "chosen": " The sea is deep.", "rejected": " Maybe."},
]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-ref"), arch="llama", seed=1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_gradients_match_trl_dpo_trainer(
    loss_type: str, tiny_model_dir: Path, reference_dir: Path, tmp_path: Path
) -> None:
    from datasets import Dataset
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    beta = 0.1
    tokenizer = load_tokenizer(tiny_model_dir)
    policy, reference = load_causal_lm(tiny_model_dir), load_causal_lm(reference_dir)
    args = TrlDPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(ROWS),
        beta=beta,
        loss_type=[loss_type],
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        use_cpu=True,
        max_length=None,
        seed=0,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    policy.zero_grad(set_to_none=True)

    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    summed, _ = sequence_logprobs(policy, ids, mask, completion)  # (2B,)
    with torch.no_grad():
        ref_summed, _ = sequence_logprobs(reference, ids, mask, completion)  # (2B,)
    b = len(ROWS)
    lengths = completion.sum(-1).float()
    logps = PairLogps(
        chosen=summed[:b],
        rejected=summed[b:],
        chosen_lengths=lengths[:b],
        rejected_lengths=lengths[b:],
        ref_chosen=ref_summed[:b],
        ref_rejected=ref_summed[b:],
    )
    # TRL's IPO uses beta as tau (their eq. 17 comment); ours names it.
    losses, chosen_rewards, rejected_rewards = preference_loss(
        loss_type, logps, PreferenceHyper(beta=beta, ipo_tau=beta)
    )
    ours = losses.mean()
    ours.backward()

    assert abs(ours.item() - trl_loss.item()) < 1e-5, (ours.item(), trl_loss.item())
    assert ours.item() > 0.0
    ours_grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    assert ours_grads.keys() == trl_grads.keys()
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, trl_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    if loss_type == "sigmoid":  # TRL logs beta * log-ratio for every loss type
        assert trl_metrics["rewards/chosen"] == pytest.approx(
            chosen_rewards.mean().item(), abs=1e-5
        )
        assert trl_metrics["rewards/rejected"] == pytest.approx(
            rejected_rewards.mean().item(), abs=1e-5
        )
        accuracy = (chosen_rewards > rejected_rewards).float().mean().item()
        assert trl_metrics["rewards/accuracies"] == pytest.approx(accuracy)
