"""mllama test inputs made by transformers' own processor code (no hub, no tokenizer): cross-attention masks from
``processing_mllama.get_cross_attention_token_mask`` and ``convert_sparse_cross_attention_mask_to_dense``, and model
inputs for ``fastflamingo.testing.tiny_mllama`` (token 0 = pad, ``IMAGE`` = the image token)."""
import random

import torch

import helpers

IMAGE = 99  # tiny_mllama's image token (vocab_size - 1)
PAD = 0
# kernel-level tests: tokens per tile (not a multiple of any kernel tile, like 1601) and tiles per image slot
P, T = 7, 3
# max |kernel - reference| / max |reference| for (output, gradients)
TOLERANCE = {torch.float32: (1e-4, 2e-4), torch.float16: (5e-3, 1e-2), torch.bfloat16: (3e-2, 6e-2)}


def processor_mask(rows, num_tiles, max_tiles=4):
    """The processor's (batch, text, images, tiles) int64 mask for token rows (lists of ids, already padded to one
    length) with ``num_tiles[b][j]`` tiles for the j-th image of row b."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    token_masks = [get_cross_attention_token_mask(row, IMAGE) for row in rows]
    dense = convert_sparse_cross_attention_mask_to_dense(token_masks, num_tiles, max_tiles, max(map(len, rows)))
    return torch.from_numpy(dense)


def random_rows(rng: random.Random, batch: int, length: int, max_images: int, max_tiles: int):
    """Random prompts: 0..max_images image tokens anywhere (consecutive ones included), left or right padding."""
    rows, tiles = [], []
    for _ in range(batch):
        used = rng.randint(0, length - 1)
        body = [rng.randint(3, IMAGE - 1) for _ in range(used)]
        for _ in range(rng.randint(0, max_images)):
            body.insert(rng.randint(0, len(body)), IMAGE)
        body = body[:length]
        pad = [PAD] * (length - len(body))
        rows.append(pad + body if rng.random() < 0.5 else body + pad)
        tiles.append([rng.randint(1, max_tiles) for _ in range(body.count(IMAGE))])
    return rows, tiles


def _t(n, start=3):
    return [start + (i * 7) % 90 for i in range(n)]


# Named layouts: (rows, tiles per image). Text tokens are arbitrary ids in [3, 93).
CASES = {
    # one image of 1, 2, 3, 4 tiles at the start of each prompt
    "tiles_1_to_4": ([[IMAGE] + _t(9, s) for s in range(4)], [[1], [2], [3], [4]]),
    # three images between text, and a sample with text before its only image (two padded image slots)
    "interleaved": ([[IMAGE] + _t(3) + [IMAGE] + _t(2) + [IMAGE] + _t(4), _t(4) + [IMAGE] + _t(7)],
                    [[2, 1, 4], [3]]),
    # consecutive image tokens see the text after the last of them together
    "consecutive": ([[IMAGE, IMAGE] + _t(3) + [IMAGE] + _t(5), _t(1) + [IMAGE, IMAGE, IMAGE] + _t(7)],
                    [[1, 3, 2], [2, 1, 4]]),
    # a text-only sample in a batch with images
    "text_only": ([[IMAGE] + _t(10), _t(11)], [[3], []]),
    # left padding (generation's padding side): the pad tokens see nothing
    "left_padding": ([[PAD] * 4 + [IMAGE] + _t(6), [IMAGE] + _t(5) + [IMAGE] + _t(4)], [[2], [1, 4]]),
}


def model_inputs(rows, tiles, max_tiles=4, image_size=28, seed=0, mask=True):
    """Inputs of ``MllamaForConditionalGeneration`` for these prompts: random pixels, aspect ratio ids ``n`` for
    ``n`` tiles (tiny_mllama's ratios are 1 x n), 0 for padded image slots."""
    batch, length = len(rows), len(rows[0])
    num_images = max(1, max(len(t) for t in tiles))
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, num_images, max_tiles, 3, image_size, image_size, generator=g)
    ratio_ids = torch.zeros(batch, num_images, dtype=torch.long)
    ratio_mask = torch.zeros(batch, num_images, max_tiles, dtype=torch.long)
    for b, sample in enumerate(tiles):
        for j, n in enumerate(sample):
            ratio_ids[b, j] = n
            ratio_mask[b, j, :n] = 1
    input_ids = torch.tensor(rows)
    out = dict(input_ids=input_ids, attention_mask=(input_ids != PAD).long(), pixel_values=pixel_values,
               aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask)
    if mask:
        cam = processor_mask(rows, tiles, max_tiles)
        if cam.shape[2] < num_images:  # a batch without images still has one (padded) image slot
            cam = torch.cat((cam, cam.new_zeros(batch, length, num_images - cam.shape[2], max_tiles)), dim=2)
        out["cross_attention_mask"] = cam
    return out


def prepare(cam, tokens_per_tile, dtype):
    """transformers' own expansion of a processor mask: the additive (B, 1, S, keys) mask and the row flag."""
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    return _prepare_cross_attention_mask(cam, num_vision_tokens=tokens_per_tile, dtype=dtype)


def assert_close(name, actual, expected, tol):
    """max |actual - expected| <= tol * max |expected| (exact when the reference is 0), no NaN (unwritten)."""
    helpers.assert_close(actual.detach().to("cpu", torch.float64), expected, tol, name)


def mixed_layout():
    """Two samples, 13 tokens, up to 2 images of up to 3 tiles: text before the first image (rows that see no
    image), a 1-tile image then a 3-tile image; consecutive images of 2 and 3 tiles; left padding."""
    rows = [[5, 6, IMAGE, 7, 8, 9, 10, IMAGE, 11, 12, 13, 14, 15],
            [PAD, PAD, IMAGE, IMAGE, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
    return processor_mask(rows, [[1, 3], [2, 3]], T)


def make_qkv(device, dtype, batch, num_text, heads, kv_heads, head_dim, num_keys, seed=0):
    """q as a strided view (every other head of a wider projection), k/v as transposed views of a
    (batch, keys, kv_heads, head_dim) projection: the kernels take any strides."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_text, 2 * heads, head_dim, generator=g)[:, :, ::2]
    kv = torch.randn(batch, num_keys, 2, kv_heads, head_dim, generator=g)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def nan_like(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def additive_reference(q, k, v, additive, scale):
    """transformers' attention in float64: softmax(scale q k^T + mask) v, GQA by repetition."""
    qd, kd, vd = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    group = q.shape[2] // k.shape[1]
    scores = torch.einsum("bshd,bhkd->bhsk", qd, kd.repeat_interleave(group, 1)) * scale
    if additive is not None:
        scores = scores + additive.to("cpu", torch.float64)
    return torch.einsum("bhsk,bhkd->bshd", torch.softmax(scores, -1), vd.repeat_interleave(group, 1))
