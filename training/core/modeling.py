"""Loading models and tokenizers, tiny offline models for tests, and sequence log-probs.

Everything that turns a name or path into a model goes through here, so that the rules that
matter for RLHF live in one place (numbers refer to the checklist in
``training-stack.md`` section 3, from Huang et al. 2023, "The N Implementation Details of RLHF
with PPO"):

* item 2: the pad token is never the EOS token, else EOS is masked out of training and the
  policy never learns to stop;
* item 3: position ids follow the attention mask, so left-padded rows see the same positions
  as unpadded ones;
* item 8: a fresh reward head is drawn from N(0, 1/sqrt(d_model + 1)) with zero bias;
* item 10: log-probs divide the logits by the sampling temperature;
* item 13: dropout is switched off in every model that takes part in RLHF.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

if TYPE_CHECKING:
    from training.core.config import CommonConfig

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A fixed corpus keeps the in-process BPE deterministic and independent of any download.
_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A good answer is short, kind and correct.
Raters compare two answers and say which one is better, or that they are equally good.
The reward model learns a score for each answer; the policy learns to write better ones.
What is the capital of France? Paris is the capital of France. How are you today?
I am fine, thank you. Please write a poem about the sea. The sea is blue and wide and deep.
Can you help me with my homework? Sure, tell me what the question is and I will try.
One, two, three, four, five, six, seven, eight, nine, ten. Yes. No. Maybe. Thanks!
The cat sat on the mat. The dog ate the bone. Birds sing in the morning and sleep at night.
Explain why the sky is blue: sunlight scatters in the air, and blue light scatters most.
Human: hello there. Assistant: hello! How can I help you? User: tell me a story.
Once upon a time there was a small robot who wanted to learn how to be helpful and honest.
"""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, then Apple MPS, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def set_seed(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch; each process gets its own stream (checklist item 6)."""
    seed = seed + rank * 100003
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes log-probs of the same text differ between calls (checklist item 13)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


# ---- tiny offline models -------------------------------------------------------------------


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in-process on a fixed corpus: no files, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "<|im_end|>", PAD_TOKEN, "<|im_start|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS.splitlines() * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token=PAD_TOKEN,
        additional_special_tokens=["<|im_start|>"],
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def build_tiny_causal_lm(
    out_dir: str | Path,
    *,
    arch: str = "llama",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Save a random-init Llama or GPT-2 and its tokenizer to ``out_dir`` (safetensors)."""
    from transformers import GPT2Config, LlamaConfig

    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer(vocab_size)
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config: Any
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **ids,
        )
    elif arch == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, **ids)
    else:
        raise ValueError(f"arch must be llama or gpt2, got {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---- loading -------------------------------------------------------------------------------


def _gguf_cache_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    # "v2": caches written before the quantisation note was dropped (see resolve_model_path)
    # load as GGUF-quantised and cannot be saved; they are converted again.
    key = hashlib.sha256(f"v2:{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "rlhf-platform" / "gguf" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"


def resolve_model_path(name_or_path: str | Path) -> str:
    """Turn a ``.gguf`` file into a safetensors folder (converted once, then cached).

    A model loaded with ``gguf_file=`` refuses ``save_pretrained``, and dequantising on every
    load is slow, so the state dict is copied into a model built from the same config and saved.
    The conversion writes to a temp folder and renames it, so a killed conversion leaves no
    half-written cache behind.
    """
    path = Path(name_or_path)
    if path.suffix != ".gguf" or not path.is_file():
        return str(name_or_path)
    cache = _gguf_cache_dir(path)
    if (cache / "config.json").is_file():
        return str(cache)
    started = time.monotonic()
    log.info("converting %s to safetensors, once (cached in %s)", path.name, cache)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    config = loaded.config
    # The weights are plain float32 now; kept, the GGUF ``quantization_config`` would make every
    # model loaded from the cache refuse ``save_pretrained`` ("quantized with gguf and is not
    # serializable"), so no model trained from a GGUF could be exported.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = _ensure_pad(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
    _match_pad(model, tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    cache.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, cache)
    log.info("converted %s in %.0f s", path.name, time.monotonic() - started)
    return str(cache)


def _ensure_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A new token means the embedding matrix must grow: _match_pad does that.
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a pad token that is not EOS (checklist item 2).

    Padding side is left to the caller: right for training batches, left for generation.
    """
    return _ensure_pad(AutoTokenizer.from_pretrained(resolve_model_path(name_or_path)))


def _match_pad(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings for tokens the tokenizer added (the pad token) and record its id.

    New rows are the mean of the old ones, not random draws: a policy and its reference loaded
    separately must stay identical, or the KL between them starts above zero.
    """
    embeddings: Any = model.get_input_embeddings()
    old = embeddings.weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            new_in: Any = model.get_input_embeddings()
            new_in.weight[old:] = new_in.weight[:old].mean(0)
            new_out: Any = model.get_output_embeddings()
            if new_out is not None and new_out.weight is not new_in.weight:
                new_out.weight[old:] = new_out.weight[:old].mean(0)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(
    name_or_path: str | Path, *, device: str | torch.device = "cpu", dtype: str = "float32"
) -> PreTrainedModel:
    """A causal LM in eval mode with dropout off; ``.gguf`` files are converted once."""
    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype))
    _match_pad(model, load_tokenizer(path))
    disable_dropout(model)
    model.to(resolve_device(str(device)))  # type: ignore[arg-type]
    return model.eval()


def _is_sequence_classifier(path: str) -> bool:
    config = AutoConfig.from_pretrained(path)
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def load_reward_model(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    num_labels: int = 1,
) -> PreTrainedModel:
    """A sequence-classification model whose logits are rewards, one per head.

    When the folder holds a causal LM, the backbone is kept and a fresh head is drawn from
    N(0, 1/sqrt(d_model + 1)) with zero bias (checklist item 8); the caller seeds the RNG.
    Normalisation gain/bias written by reward training live in ``model.config`` (see
    ``training.core.reward.reward_scores``).
    """
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path)
    if _is_sequence_classifier(path):
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=resolve_dtype(dtype))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=resolve_dtype(dtype)
        )
        head = _score_head(model)
        d_model = head.weight.shape[1]
        with torch.no_grad():
            nn.init.normal_(head.weight, std=1.0 / (d_model + 1) ** 0.5)
            if head.bias is not None:
                head.bias.zero_()
    _match_pad(model, tokenizer)
    disable_dropout(model)
    model.to(resolve_device(str(device)))  # type: ignore[arg-type]
    return model.eval()


def _score_head(model: nn.Module) -> nn.Linear:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise ValueError(f"cannot find the scalar head of {type(model).__name__}")


_IN_BLOCK = re.compile(r"\.(layers|h|blocks)\.\d+\.")


def apply_lora(model: nn.Module, config: CommonConfig, task_type: str) -> Any:
    """Wrap ``model`` with LoRA adapters from the common ``lora_*`` fields.

    ``task_type`` is a peft ``TaskType`` name: ``CAUSAL_LM`` or ``SEQ_CLS`` (the latter keeps
    the reward head trainable through ``modules_to_save``).
    """
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = config.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in str(targets).split(",") if t.strip()]
    layers: list[int] | None = None
    if config.lora_top_layers > 0:
        total = int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)
        if total == 0:
            raise ValueError("lora_top_layers: the model does not say how many layers it has")
        layers = list(range(max(0, total - config.lora_top_layers), total))
        if targets == "all-linear":
            # peft takes a layer subset only with named modules: every linear leaf of the
            # transformer blocks (so not the LM or reward head).
            targets = sorted(
                {
                    name.rsplit(".", 1)[-1]
                    for name, module in model.named_modules()
                    if isinstance(module, nn.Linear) and _IN_BLOCK.search(name)
                }
            )
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type=task_type,
        layers_to_transform=layers,
    )
    return get_peft_model(model, lora)


# ---- log-probs -----------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them (item 3)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits).gather(targets)`` without keeping a (B, T, V) log-softmax.

    Goes row by row: the peak extra memory is one (T, V) block instead of a full batch copy.
    """
    out = []
    for row_logits, row_targets in zip(logits, targets, strict=True):  # (T, V), (T,)
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)  # (T,)
        out.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(out)  # (B, T)


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the completion tokens under ``model``.

    Args: ``input_ids``, ``attention_mask``, ``completion_mask`` are (B, T); the completion
    mask is 1 on tokens whose probability counts (never on padding or prompt).
    Returns ``(summed (B,), per_token (B, T-1))``; ``per_token[:, t]`` is the log-prob of
    ``input_ids[:, t + 1]`` and is 0 where the completion mask is 0. Logits are divided by
    ``temperature`` (checklist item 10) so that log-probs match the sampling distribution.
    """
    seq_len = input_ids.shape[1]
    target_mask = completion_mask[:, 1:].to(torch.bool)  # (B, T-1)
    # Only logits that predict a completion token are needed; skipping the prompt's saves
    # the (B, T, V) projection for long prompts.
    cols = target_mask.any(dim=0).nonzero()
    first = int(cols[0]) if len(cols) else seq_len - 2
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=seq_len - first,
        use_cache=False,
    ).logits[:, :-1]  # (B, T-1-first, V)
    if temperature != 1.0:
        logits = logits / temperature
    kept = selective_log_softmax(logits, input_ids[:, first + 1 :])  # (B, T-1-first)
    per_token = F.pad(kept, (first, 0))  # (B, T-1)
    # where, not multiply: a padded position may hold inf/NaN, and 0 * NaN is NaN.
    per_token = torch.where(target_mask, per_token, torch.zeros_like(per_token))
    return per_token.sum(-1), per_token
