"""fastflamingo.vllm, phase 2: prompts with images through ``vllm.LLM`` on the CPU (one shared engine).

The reference is transformers' greedy ``generate`` on the same saved weights and the same ``MllamaProcessor``
outputs, one prompt at a time: the same tokens, and each new token's log-probability within 1e-4. The tiny mllama
(tests_vllm/checkpoints.py) has 28 x 28 tiles of 5 vision tokens, up to 4 tiles per image, tanh gates of 0.6 on
both cross-attention layers and its cross K/V projections scaled by 8 (``cross_kv_scale``), so that the images
steer the tokens: with transformers alone, swapping the two images of a prompt or zeroing the rows before the
first image ("zero") changes the greedy tokens of 3 and 4 of the 6 prompts.
"""
import pytest

from checkpoints import IMAGE_TOKEN, hf_mllama_image_greedy, save_tiny_mllama, tiny_image, tiny_mllama_engine

I = IMAGE_TOKEN
MAX_NEW = 8
# (width, height) -> tiles with 28 x 28 tiles: 1 (28x28), 2 (28x56), 3 (84x28), 4 (56x56)
IMAGES = {
    "t1": (28, 28, 1), "t2": (28, 56, 2), "t3": (84, 28, 3), "t4": (56, 56, 4),
    "t1b": (30, 26, 11), "t4b": (60, 50, 12), "t2b": (40, 90, 13),
}


def _img(name):
    w, h, seed = IMAGES[name]
    return tiny_image(w, h, seed)


# Every prompt starts with the BOS text "<s>", as chat templates write it: transformers' MllamaProcessor inserts
# one when the text lacks it (and its tokenizer adds another), vLLM does not, so the same text gives the same ids
# only with it. The tests check the ids too.
CASES = {
    "no_image": ("<s> w1 w2 w3 w4", []),
    "one_image_first": (f"<s> {I} w5 w6 w7", ["t1"]),
    "one_image_later_4_tiles": (f"<s> w3 w4 w5 {I} w8 w9", ["t4"]),
    "two_images_apart": (f"<s> {I} w1 w2 {I} w3 w4", ["t2", "t3"]),
    "consecutive_images": (f"<s> w9 {I} {I} w10 w11", ["t3", "t1b"]),
    "three_images": (f"<s> w7 {I} w1 {I} {I} w2 w3", ["t4b", "t2b", "t1"]),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_mllama(tmp_path_factory.mktemp("tiny_mllama_images"), cross_kv_scale=8.0)


@pytest.fixture(scope="module")
def reference(checkpoint):
    reqs = [(prompt, [_img(n) for n in names]) for prompt, names in CASES.values()]
    tokens, prompt_ids, logprobs = hf_mllama_image_greedy(checkpoint, reqs, MAX_NEW)
    return dict(zip(CASES, tokens)), dict(zip(CASES, prompt_ids)), dict(zip(CASES, logprobs))


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = tiny_mllama_engine(checkpoint)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _request(name):
    prompt, names = CASES[name]
    if not names:
        return {"prompt": prompt}
    return {"prompt": prompt, "multi_modal_data": {"image": [_img(n) for n in names]}}


def _generate(llm, requests, max_new=MAX_NEW):
    from vllm import SamplingParams

    outs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True, logprobs=0))
    logprobs = [[step[tok].logprob for step, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                for o in outs]
    return [list(o.outputs[0].token_ids) for o in outs], [list(o.prompt_token_ids) for o in outs], logprobs


@pytest.fixture(scope="module")
def tiles(checkpoint):
    """Real tiles per image under the checkpoint's image processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    return {name: int(processor.image_processor(images=[[_img(name)]], return_tensors="pt")["aspect_ratio_mask"].sum())
            for name in IMAGES}


def test_tiles_per_image(tiles):
    # the cases cover images of 1, 2, 3 and 4 tiles
    assert [tiles[n] for n in ("t1", "t2", "t3", "t4")] == [1, 2, 3, 4]


@pytest.mark.parametrize("name", list(CASES))
def test_one_request_matches_transformers(llm, reference, name):
    tokens, prompt_ids, logprobs = _generate(llm, [_request(name)])
    expected, expected_ids, expected_logprobs = reference
    assert prompt_ids[0] == expected_ids[name]
    assert tokens[0] == expected[name]
    assert logprobs[0] == pytest.approx(expected_logprobs[name], abs=1e-4)


def test_mixed_batch_matches_transformers(llm, reference):
    # every case in one generate call: prefills of 0-3 images, then decodes, share steps
    names = list(CASES) + ["one_image_first", "no_image"]
    tokens, _, logprobs = _generate(llm, [_request(n) for n in names])
    assert tokens == [reference[0][n] for n in names]
    for name, got in zip(names, logprobs):
        assert got == pytest.approx(reference[2][name], abs=1e-4), name


BAD_REQUESTS = {
    # more images than <|image|> tokens
    "more_images_than_tokens": ({"prompt": f"<s> {I} w1 w2", "multi_modal_data": {"image": [_img("t1"), _img("t2")]}},
                                r"1 <\|image\|> token\(s\) but 2 image\(s\)"),
    # an <|image|> token without an image
    "token_without_image": ({"prompt": f"<s> w1 {I} w2"}, r"1 <\|image\|> token\(s\) but 0 image\(s\)"),
    # more images than limit_mm_per_prompt allows (3 here)
    "too_many_images": ({"prompt": f"<s> {I} {I} {I} {I} w1",
                         "multi_modal_data": {"image": [_img("t1"), _img("t2"), _img("t3"), _img("t1b")]}},
                        r"4 images; at most 3"),
    # a prompt longer than max_model_len (256)
    "prompt_past_context": ({"prompt": "<s> " + " ".join(f"w{i % 100}" for i in range(300))},
                            r"maximum context length is 256"),
}


from vllm.exceptions import VLLMValidationError  # noqa: E402  (the vLLM venv: conftest skips the tier without it)


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_refused_and_the_engine_keeps_serving(llm, reference, name):
    request, message = BAD_REQUESTS[name]
    # ValueError, or vLLM's own VLLMValidationError (its client errors: HTTP 400 from the server)
    with pytest.raises((ValueError, VLLMValidationError), match=message):
        _generate(llm, [request])
    names = ["two_images_apart", "no_image"]
    tokens, _, _ = _generate(llm, [_request(n) for n in names])
    assert tokens == [reference[0][n] for n in names]
