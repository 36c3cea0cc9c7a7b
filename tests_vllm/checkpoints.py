"""Tiny random checkpoints saved to a local folder, for vLLM to load without the Hub.

vLLM loads a model the way it loads a real one: ``config.json``, safetensors weights and a tokenizer from a folder.
The tokenizer is a ``tokenizers`` WordLevel model over a fixed word list (built here, nothing downloaded), wrapped in
``PreTrainedTokenizerFast`` so that ``AutoTokenizer`` (what vLLM calls) finds a ``tokenizer_config.json``.
"""
from __future__ import annotations

from pathlib import Path

import torch

# ids 0..2 are the specials; the words follow, then (for mllama) the image token as the last id
SPECIALS = ["<pad>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(120)]


def build_tokenizer(extra_tokens=()):
    """A whitespace WordLevel tokenizer: ``<s>`` prepended, unknown words mapped to ``w0``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + list(extra_tokens))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="w0", additional_special_tokens=list(extra_tokens) or None)
    return fast


def save_tiny_llama(path: Path, *, seed: int = 0, hidden_size: int = 256, head_dim: int = 64,
                    num_layers: int = 2, dtype=torch.float32) -> Path:
    """A random ``LlamaForCausalLM`` (hidden 256, 4 heads of 64, 2 K/V heads, 2 layers) and its tokenizer in
    ``path``. head_dim 64: vLLM's CPU attention backend does not take every head size (16 fails there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=hidden_size // head_dim,
                         num_key_value_heads=max(1, hidden_size // head_dim // 2), head_dim=head_dim,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False, torch_dtype=dtype)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def hf_greedy(path: Path, prompts, max_new_tokens: int):
    """transformers' greedy continuation (token ids only) of each prompt, one at a time: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out
