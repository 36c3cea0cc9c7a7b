"""Load and forward times of a model patched after loading against the same model built with load-time drop-ins.

    OMP_NUM_THREADS=1 .venv/bin/python tools/time_load_routes.py

Two small random models (mllama: hidden 512, 8 layers, 2 of them cross; IDEFICS: hidden 512, 8 layers), saved to a
temporary folder: ``from_pretrained`` alone, ``from_pretrained`` + ``fastflamingo.patch``, and ``from_pretrained``
inside ``fastflamingo.dropins()`` (medians of 5); then the two patched models' forwards interleaved, 15 rounds (the
logits are checked identical first). The builders are the test suite's (tests/mllama_cases.py, tests/test_idefics.py).
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import fastflamingo  # noqa: E402
from fastflamingo import testing  # noqa: E402
from mllama_cases import CASES, model_inputs as mllama_inputs  # noqa: E402
from test_idefics import model_inputs as idefics_inputs  # noqa: E402


def median_and_min(fn, rounds):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main():
    models = {
        "mllama": (testing.tiny_mllama("sdpa", hidden_size=512, num_heads=8, num_kv_heads=2, intermediate_size=1024,
                                       num_layers=8, cross_attention_layers=(3, 7), image_size=56, vocab_size=1000),
                   lambda: mllama_inputs(*CASES["interleaved"], image_size=56)),
        "idefics": (testing.tiny_idefics(hidden=512, heads=8, intermediate_size=1024, num_hidden_layers=8,
                                         hidden_act="silu"),
                    lambda: idefics_inputs(batch=2, num_text=64)),
    }
    for family, (reference, make_inputs) in models.items():
        folder = tempfile.mkdtemp()
        reference.save_pretrained(folder)
        cls, inputs = type(reference), make_inputs()
        cls.from_pretrained(folder)  # the file cache and the imports warm

        def plain():
            return cls.from_pretrained(folder)

        def patched():
            model = cls.from_pretrained(folder)
            fastflamingo.patch(model)
            return model

        def dropins():
            with fastflamingo.dropins():
                return cls.from_pretrained(folder)

        for name, fn in (("from_pretrained", plain), ("from_pretrained + patch()", patched),
                         ("dropins() from_pretrained", dropins)):
            median, low = median_and_min(fn, 5)
            print(f"{family:8s} load {name:28s} median {median * 1e3:8.1f} ms  min {low * 1e3:8.1f} ms")
        a, b = patched().eval(), dropins().eval()
        with torch.no_grad():
            assert torch.equal(a(**inputs).logits, b(**inputs).logits)
            for _ in range(2):
                a(**inputs)
                b(**inputs)
            times_a, times_b = [], []
            for _ in range(15):  # interleaved: drift of the machine hits both alike
                times_a.append(median_and_min(lambda: a(**inputs), 1)[0])
                times_b.append(median_and_min(lambda: b(**inputs), 1)[0])
        print(f"{family:8s} forward patch(): median {statistics.median(times_a) * 1e3:.2f} ms "
              f"(min {min(times_a) * 1e3:.2f}); load-time drop-ins: median {statistics.median(times_b) * 1e3:.2f} ms "
              f"(min {min(times_b) * 1e3:.2f})")


if __name__ == "__main__":
    main()
