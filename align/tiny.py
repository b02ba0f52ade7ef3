"""Tiny offline models: a character-level tokenizer with a chat template and a random Llama-style model.

Nothing is downloaded. Used by the tests and by the CPU quickstart (``model.name: tiny``). Llama rather than Qwen2:
``AutoTokenizer`` keeps a saved fast tokenizer as it is for Llama, while for Qwen2 it swaps in ``Qwen2Tokenizer``
whose pre-tokenizer gives different ids. head_dim is 64 because vLLM's CPU attention rejects 16.
"""

from __future__ import annotations

import os
import string

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARSET = string.digits + string.ascii_letters + string.punctuation + " \n"

# Loss on assistant turns needs `{% generation %}` markers (transformers' return_assistant_tokens_mask).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}</s>{% endgeneration %}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(charset: str = CHARSET):
    """A fast tokenizer with one token per character plus the special tokens above."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in charset:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, *, hidden_size=128, num_layers=2, num_heads=2, head_dim=64, intermediate_size=512,
                max_position_embeddings=512, tie_word_embeddings=True, seed=0):
    """A randomly initialised LlamaForCausalLM sized for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny(path: str, seed: int = 0, **shape) -> str:
    """Build the tokenizer and model and save both to ``path`` (HF format, safetensors). Returns ``path``."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, **shape)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
