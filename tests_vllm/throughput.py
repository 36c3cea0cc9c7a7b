"""CPU throughput of fastflamingo.vllm against transformers' ``generate`` one request at a time (issue 21's CPU
target: 8 concurrent requests through the plugin >= 3x transformers one by one, same outputs).

Not a test: a measurement, run by hand in the vLLM venv::

    .venv-vllm/bin/python tests_vllm/throughput.py [--requests 8] [--new 32] [--reserved-cpus 0]

Shapes: issue 21's "tiny-but-real" text model (hidden 1024, 8 query heads and 2 K/V heads of 128, 4 layers with
cross-attention layers 1 and 3) and Llama 3.2's tile size (560 x 560 tiles of 14 x 14 patches: 1601 vision tokens
per tile, up to 4 tiles; ``max_model_len`` 8192, since vLLM wants a request's encoder tokens within it), with a
small random vision tower (hidden 64, 2 + 1 layers); every request has one
2-tile image (3202 real image tokens). Both sides load first and run one warm-up request untimed; both get the
machine's cores (``--reserved-cpus``). Prints tokens/s both ways, the ratio, and whether the greedy tokens agree.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _hf_one_by_one(path, prompts, new_tokens):
    """transformers' greedy ``generate``, one request after the other (processor included, like vLLM's rendering),
    after one warm-up request; returns the new tokens and the seconds."""
    import torch
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = MllamaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()

    def generate(prompt, images):
        inputs = processor(text=prompt, images=images, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    generate(*prompts[0])
    t0 = time.perf_counter()
    tokens = [generate(prompt, images) for prompt, images in prompts]
    return tokens, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reserved-cpus", type=int, default=0,
                    help="VLLM_CPU_NUM_OF_RESERVED_CPU: cores vLLM's CPU worker leaves to its scheduler process "
                         "(vLLM's x86 default is 1, which on a 2-core machine leaves the model one core while "
                         "transformers runs on both; 0 gives both sides the same cores)")
    args = ap.parse_args()

    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.reserved_cpus)
    from checkpoints import IMAGE_TOKEN, save_tiny_mllama, tiny_image

    path = save_tiny_mllama(Path(tempfile.mkdtemp()) / "mllama", hidden_size=1024, head_dim=128, num_layers=4,
                            cross_attention_layers=(1, 3), image_size=560, patch_size=14, cross_kv_scale=1.0,
                            num_kv_heads=2, vision_hidden=64,
                            max_positions=8192)
    prompts = [(f"<s> w{i} w{i + 1} {IMAGE_TOKEN} " + " ".join(f"w{(i * 7 + j) % 100}" for j in range(24)),
                [tiny_image(560, 1120, 100 + i)]) for i in range(args.requests)]

    expected, hf_s = _hf_one_by_one(path, prompts, args.new)

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), dtype="float32", max_model_len=8192, max_num_seqs=args.requests, enforce_eager=True,
              max_num_batched_tokens=8192 * 2, gpu_memory_utilization=0.05, seed=0,
              limit_mm_per_prompt={"image": 1})
    requests = [{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=args.new, ignore_eos=True)
    llm.generate(requests[:1], params)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(requests, params)
    vllm_s = time.perf_counter() - t0
    got = [list(o.outputs[0].token_ids) for o in outs]
    tokens = args.requests * args.new
    print(f"transformers one by one: {tokens / hf_s:.1f} tok/s ({hf_s:.1f} s, after a warm-up request)")
    print(f"fastflamingo.vllm, {args.requests} concurrent ({args.reserved_cpus} reserved cores): "
          f"{tokens / vllm_s:.1f} tok/s ({vllm_s:.1f} s, after a warm-up request)")
    print(f"ratio {hf_s / vllm_s:.2f}x; same tokens: {sum(g == e for g, e in zip(got, expected))}/{args.requests}")
    llm.llm_engine.engine_core.shutdown()

if __name__ == "__main__":
    main()
