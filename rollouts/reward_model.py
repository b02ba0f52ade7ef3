"""A learned reward: any ``AutoModelForSequenceClassification`` checkpoint, batched, on its own device.

The reward model has its own tokenizer, which need not be the policy's: it scores the *decoded text* (prompt +
completion, or the chat conversation through its own chat template when the prompt was chat messages), never the
policy's token ids.
"""

from __future__ import annotations

from .rewards import reward

_DTYPES = ("float32", "bfloat16", "float16")


class RewardModel:
    def __init__(self, path: str, device: str = "cpu", batch_size: int = 16, max_length: int = 1024,
                 dtype: str = "float32", label: int = 0, chat_template: bool = True, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"reward_model: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
        if batch_size < 1 or max_length < 2:
            raise ValueError("reward_model: batch_size must be ≥ 1 and max_length ≥ 2")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ValueError(f"reward_model: cannot load a sequence-classification model from {path!r}: {e}") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id  # the score is read at the last real token
        if not 0 <= label < self.model.config.num_labels:
            raise ValueError(f"reward_model: label {label} but {path!r} has {self.model.config.num_labels} outputs")
        self.tokenizer.truncation_side = "left"  # keep the end of the completion, where the score is read
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)
        self.batch_size, self.max_length, self.label = batch_size, max_length, label
        self.use_template = chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def texts(self, prompts: list[str], completions: list[str], prompt_messages: list | None = None) -> list[str]:
        out = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            messages = prompt_messages[i] if prompt_messages is not None else None
            if self.use_template and isinstance(messages, list):
                out.append(self.tokenizer.apply_chat_template(
                    list(messages) + [{"role": "assistant", "content": c}], tokenize=False))
            else:
                out.append(p + c)
        return out

    def __call__(self, prompts: list[str], completions: list[str], prompt_messages: list | None = None,
                 **fields) -> list[float]:
        import torch

        texts = self.texts(prompts, completions, prompt_messages)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths share a batch
        scores = [0.0] * len(texts)
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=not self.use_template)
                logits = self.model(**enc.to(self.device)).logits.float()  # (b, num_labels)
                for i, v in zip(idx, logits[:, self.label].tolist()):
                    scores[i] = v
        return scores


@reward("reward_model")
def reward_model(path: str, device: str = "cpu", batch_size: int = 16, max_length: int = 1024, dtype: str = "float32",
                 label: int = 0, chat_template: bool = True, trust_remote_code: bool = False) -> RewardModel:
    """The score of a sequence-classification model (logit `label`) on the decoded prompt + completion, tokenised by
    the reward model's own tokenizer (its chat template for chat prompts). Loaded once on `device`; batched."""
    return RewardModel(path, device=device, batch_size=batch_size, max_length=max_length, dtype=dtype, label=label,
                       chat_template=chat_template, trust_remote_code=trust_remote_code)
