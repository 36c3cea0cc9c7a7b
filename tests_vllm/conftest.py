"""The vLLM tier: run with the vLLM venv (tools/vllm_env.sh), e.g. `.venv-vllm/bin/python -m pytest tests_vllm`.

Engine starts are slow on a CPU (about a minute each), so each test module shares one engine.
"""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the CPU backend reserves this much host memory (GiB) for the KV cache; its default would take a large slice of a
# 24 GiB machine
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("vllm", reason="the vLLM tier needs the vLLM venv (bash tools/vllm_env.sh)")
