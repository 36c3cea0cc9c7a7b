"""fastflamingo.vllm: a tiny random mllama served text-only through ``vllm.LLM`` on the CPU (prompts with images:
test_mllama_images.py).

The reference is transformers' greedy ``generate`` on the same saved weights, one prompt at a time.
"""
import pytest

from checkpoints import hf_mllama_greedy, save_tiny_mllama

PROMPTS = ["w1 w2 w3", "w10 w20 w30 w40 w50 w60 w70", "w7", "w3 w3 w3 w3"]
MAX_NEW = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_mllama(tmp_path_factory.mktemp("tiny_mllama"))


@pytest.fixture(scope="module")
def llm(checkpoint):
    from vllm import LLM

    engine = LLM(model=str(checkpoint), dtype="float32", max_model_len=256, max_num_seqs=4, enforce_eager=True,
                 gpu_memory_utilization=0.05, seed=0)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _greedy(llm, prompts, max_new=MAX_NEW):
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]


def test_register_makes_mllama_an_encoder_decoder_model(checkpoint):
    from transformers import AutoConfig
    from vllm.model_executor.models import ModelRegistry

    import fastflamingo.vllm as plugin

    plugin.register()
    plugin.register()  # vLLM may call it several times per process
    config = AutoConfig.from_pretrained(checkpoint)
    assert config.is_encoder_decoder is True
    assert config.image_token_index == config.text_config.vocab_size
    assert plugin.MODEL_ARCH in ModelRegistry.get_supported_archs()
    assert ModelRegistry.models[plugin.MODEL_ARCH].module_name == "fastflamingo.vllm.mllama"


def test_engine_runs_in_encoder_decoder_mode(llm):
    config = llm.llm_engine.vllm_config
    assert config.model_config.is_encoder_decoder
    assert config.model_config.architecture == "MllamaForConditionalGeneration"
    # what vLLM's encoder-decoder mode implies, and the plugin design relies on (docs/vllm_notes.md)
    assert not config.scheduler_config.enable_chunked_prefill
    assert not config.cache_config.enable_prefix_caching


def test_text_only_greedy_matches_transformers(llm, checkpoint):
    expected = hf_mllama_greedy(checkpoint, PROMPTS, MAX_NEW)
    assert _greedy(llm, PROMPTS) == expected
