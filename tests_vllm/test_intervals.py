"""fastflamingo.vllm.intervals against transformers' own mllama mask rule (no engine needed)."""
import random

import pytest
import torch

from fastflamingo.vllm.intervals import prompt_image_ranges

IMG = 99


def _transformers_rows(ids):
    """Per token, the set of images it sees under transformers' processor (``get_cross_attention_token_mask``)."""
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    rows = [set() for _ in ids]
    for image, (start, end) in enumerate(get_cross_attention_token_mask(ids, IMG)):
        end = len(ids) if end == -1 else end
        for t in range(start, end):
            rows[t].add(image)
    return rows


def _random_prompt(rng, length):
    ids, t = [], 0
    while t < length:
        if rng.random() < 0.25:
            run = rng.choice([1, 1, 2, 3])
            ids += [IMG] * run
            t += run
        else:
            ids.append(rng.randrange(3, 50))
            t += 1
    return ids[:length]


def _check(prompts):
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64)
    qsl = torch.tensor([0] + list(torch.tensor([len(p) for p in prompts]).cumsum(0).tolist()))
    start, end = prompt_image_ranges(ids, qsl, IMG)
    assert start.dtype == end.dtype == torch.int32
    offset = 0
    for p in prompts:
        for t, expected in enumerate(_transformers_rows(p)):
            s, e = start[offset + t].item(), end[offset + t].item()
            assert set(range(s, e)) == expected, (p, t, s, e, expected)
            if not expected:
                assert s == e == 0
        offset += len(p)


@pytest.mark.parametrize("prompt", [
    [1, 5, 6],                          # no image
    [IMG, 1, 5, 6],                     # one leading image
    [1, 5, IMG, 6, 7],                  # an image not at the start: the text before it sees nothing
    [IMG, IMG, 5, 6],                   # consecutive images: the second token sees both
    [IMG, 5, IMG, 6, IMG, IMG, 7],      # runs separated by text
    [1, IMG],                           # the prompt ends on an image
])
def test_single_prompts(prompt):
    _check([prompt])


def test_packed_step_matches_each_prompt_alone():
    rng = random.Random(0)
    for _ in range(200):
        prompts = [_random_prompt(rng, rng.randint(1, 24)) for _ in range(rng.randint(1, 6))]
        _check(prompts)


def test_images_of_an_earlier_request_do_not_leak():
    # the previous request ends inside an image run: a request starting with text sees nothing until its own image,
    # and one starting with an image starts a run of its own
    _check([[1, IMG, IMG], [4, 5, IMG, 6]])
    _check([[1, IMG, IMG], [IMG, 5, 6]])
