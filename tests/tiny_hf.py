"""A tiny Hugging Face causal LM with a character-level tokenizer, built locally (no hub)."""

from __future__ import annotations

import torch

from kldsl.hf import HFLM


def tiny_tokenizer(chars: str = "abcdefgh "):
    """A character-level tokenizer: <pad>=0, <bos>=1, <eos>=2, then the characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def tiny_model(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, **extra):
    """A randomly initialised Llama (seeded), peaked enough that EOS is drawn often."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )
    return LlamaForCausalLM(config)


def tiny_hf(chars: str = "abcdefgh ", name: str = "tiny", **model_options) -> HFLM:
    tokenizer = tiny_tokenizer(chars)
    return HFLM(tiny_model(len(tokenizer), **model_options), tokenizer, name)
