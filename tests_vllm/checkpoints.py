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


def hf_greedy(path: Path, prompts, max_new_tokens: int, model_class=None):
    """transformers' greedy continuation (token ids only) of each prompt, one at a time: the reference.
    ``model_class``: default ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = (model_class or AutoModelForCausalLM).from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


IMAGE_TOKEN = "<|image|>"


def save_tiny_mllama(path: Path, *, seed: int = 0, hidden_size: int = 256, head_dim: int = 64,
                     num_layers: int = 4, cross_attention_layers=(1, 3), gate: float = 0.6, image_size: int = 28,
                     patch_size: int = 14, max_num_tiles: int = 4, cross_kv_scale: float = 1.0,
                     num_kv_heads=None, vision_hidden: int = 32, max_positions: int = 512,
                     dtype=torch.float32) -> Path:
    """A random ``MllamaForConditionalGeneration`` and its ``MllamaProcessor`` in ``path``: a text model of hidden
    256 (4 heads of 64, 2 K/V heads; 64 because vLLM's CPU attention backend takes it) with cross-attention layers
    ``cross_attention_layers``, a 2-layer vision tower on 28 x 28 tiles of 14 x 14 patches (5 vision tokens per
    tile), up to 4 tiles per image (the default aspect ratios, every h x w <= 4 tiles, which the image processor also
    uses). The tanh gates are set to ``gate`` (upstream initialises
    them to 0, which would hide the cross-attention layers). ``cross_kv_scale`` multiplies the cross-attention
    ``k_proj`` and ``v_proj`` weights: at 1 the random layers average the image tokens into nearly the same vector
    whatever the image (swapping two images or zeroing the rows before the first one left every greedy token of the
    image tests unchanged); at 8 the attention is peaked and the values large enough that they do not. Token ids: the tokenizer's words, then ``<|image|>``
    as the last id, which is also the text config's ``vocab_size`` (as in Llama 3.2 Vision, the image token has an
    embedding row but no output logit)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    path = Path(path)
    tokenizer = build_tokenizer(extra_tokens=(IMAGE_TOKEN,))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = MllamaConfig(
        vision_config=dict(hidden_size=vision_hidden, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                           intermediate_size=2 * vision_hidden, image_size=image_size, patch_size=patch_size,
                           max_num_tiles=max_num_tiles, intermediate_layers_indices=[0, 1],
                           vision_output_dim=3 * vision_hidden),
        text_config=dict(vocab_size=image_token_id, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=hidden_size // head_dim,
                         num_key_value_heads=num_kv_heads or hidden_size // head_dim // 2,
                         intermediate_size=2 * hidden_size, cross_attention_layers=list(cross_attention_layers),
                         max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(gate)
            if ".cross_attn.k_proj." in name or ".cross_attn.v_proj." in name:
                param.mul_(cross_kv_scale)
    model.save_pretrained(path, safe_serialization=True)
    image_processor = MllamaImageProcessor(max_image_tiles=max_num_tiles, size={"height": image_size,
                                                                                "width": image_size})
    MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def hf_mllama_greedy(path: Path, prompts, max_new_tokens: int):
    """transformers' greedy continuation of text-only prompts (token ids), one prompt at a time."""
    from transformers import MllamaForConditionalGeneration

    return hf_greedy(path, prompts, max_new_tokens, MllamaForConditionalGeneration)


def tiny_image(width: int, height: int, seed: int):
    """A random RGB image (noise, so that every tile's vision states differ)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def hf_mllama_image_greedy(path: Path, requests, max_new_tokens: int, empty_rows=None):
    """transformers' greedy continuation (token ids) of ``(prompt, images)`` requests, one at a time, through the
    checkpoint's ``MllamaProcessor``; ``empty_rows="zero"``: the model patched with
    ``fastflamingo.patch(model, empty_rows="zero")`` (Meta's reference semantics). Also returns each prompt's
    input ids and, per new token, its log-probability (log-softmax of the raw logits)."""
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = MllamaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    if empty_rows is not None:
        import fastflamingo

        fastflamingo.patch(model, empty_rows=empty_rows)
    out, prompt_ids, logprobs = [], [], []
    for prompt, images in requests:
        inputs = processor(text=prompt, images=images or None, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        n = inputs["input_ids"].shape[1]
        new = gen.sequences[0, n:].tolist()
        out.append(new)
        prompt_ids.append(inputs["input_ids"][0].tolist())
        logprobs.append([torch.log_softmax(step[0].float(), -1)[tok].item() for step, tok in zip(gen.logits, new)])
    return out, prompt_ids, logprobs


def tiny_mllama_engine(path: Path, **overrides):
    """``vllm.LLM`` on a tiny mllama checkpoint with the settings the engine tests share (fp32, eager, 256-token
    context, up to 8 sequences and 3 images per prompt, 5% of host memory for the caches); ``overrides`` adds or
    replaces ``LLM`` arguments (``hf_overrides`` for the plugin's options)."""
    from vllm import LLM

    args = dict(model=str(path), dtype="float32", max_model_len=256, max_num_seqs=8, enforce_eager=True,
                max_num_batched_tokens=512, gpu_memory_utilization=0.05, seed=0, limit_mm_per_prompt={"image": 3})
    args.update(overrides)
    return LLM(**args)
