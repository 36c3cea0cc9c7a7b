"""fastflamingo.vllm with ``empty_rows="zero"`` (Meta's reference semantics: a text row that sees no image, i.e.
every row before a prompt's first image, gets no cross-attention output), set per engine through
``hf_overrides={"fastflamingo_empty_rows": "zero"}``. The reference is transformers patched with
``fastflamingo.patch(model, empty_rows="zero")``; one shared engine.
"""
import pytest

from checkpoints import hf_mllama_image_greedy, save_tiny_mllama, tiny_mllama_engine
from test_mllama_images import CASES, MAX_NEW, _generate, _img, _request

# cases with text rows before the first image (BOS at least: all of them) and one without images
NAMES = ["no_image", "one_image_first", "one_image_later_4_tiles", "two_images_apart", "consecutive_images"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_mllama(tmp_path_factory.mktemp("tiny_mllama_zero"), cross_kv_scale=8.0)


@pytest.fixture(scope="module")
def references(checkpoint):
    reqs = [(CASES[n][0], [_img(i) for i in CASES[n][1]]) for n in NAMES]
    zero_tokens, _, zero_logprobs = hf_mllama_image_greedy(checkpoint, reqs, MAX_NEW, empty_rows="zero")
    hf_tokens, _, _ = hf_mllama_image_greedy(checkpoint, reqs, MAX_NEW)
    return dict(zip(NAMES, zero_tokens)), dict(zip(NAMES, zero_logprobs)), dict(zip(NAMES, hf_tokens))


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = tiny_mllama_engine(checkpoint, hf_overrides={"fastflamingo_empty_rows": "zero"})
    yield engine
    engine.llm_engine.engine_core.shutdown()


def test_the_two_semantics_differ_on_these_prompts(references):
    zero, _, hf = references
    assert sum(zero[n] != hf[n] for n in NAMES) >= 2


def test_zero_rows_match_patched_transformers(llm, references):
    zero, zero_logprobs, _ = references
    tokens, _, logprobs = _generate(llm, [_request(n) for n in NAMES])
    assert tokens == [zero[n] for n in NAMES]
    for name, got in zip(NAMES, logprobs):
        assert got == pytest.approx(zero_logprobs[name], abs=1e-4), name
