"""Smoke run: a tiny random Llama generates greedily through ``vllm.LLM`` on the CPU, checked against transformers.

    .venv-vllm/bin/python tests_vllm/smoke_llama.py [--dir DIR]

Prints the engine start and generate wall times and exits non-zero when vLLM's tokens differ from transformers'
greedy tokens on the same weights. The engine spawns worker processes, hence the ``__main__`` guard.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = ["w1 w2 w3", "w10 w20 w30 w40 w50", "w7"]
MAX_NEW = 8


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", help="where to save the checkpoint (default: a temporary folder)")
    args = parser.parse_args()
    # the CPU backend reserves this much host memory for the KV cache (GiB); the default would take a large slice of
    # a 24 GiB machine
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from checkpoints import hf_greedy, save_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_llama(Path(args.dir or tmp))
        expected = hf_greedy(path, PROMPTS, MAX_NEW)

        from vllm import LLM, SamplingParams

        t0 = time.perf_counter()
        llm = LLM(model=str(path), dtype="float32", max_model_len=256, max_num_seqs=4, enforce_eager=True,
                  gpu_memory_utilization=0.05, seed=0)
        t1 = time.perf_counter()
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
        t2 = time.perf_counter()
        got = [list(o.outputs[0].token_ids) for o in outs]
        print(f"engine start {t1 - t0:.1f} s, generate {t2 - t1:.2f} s ({len(PROMPTS)} prompts x {MAX_NEW} tokens)")
        for prompt, g, e in zip(PROMPTS, got, expected):
            print(f"{prompt!r}: vllm {g} transformers {e} {'same' if g == e else 'DIFFERENT'}")
        return 0 if got == expected else 1


if __name__ == "__main__":
    sys.exit(main())
