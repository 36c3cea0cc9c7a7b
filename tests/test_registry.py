"""The model registry (``fastflamingo.models.FAMILIES``) is the one list of families: every reader of it serves every
family. Each test below fails when a family is missing from one of them: ``patch`` / ``unpatch``, ``warmup``,
``python -m fastflamingo.info``, the test kit, the README's model table, docs/design.md."""
import re
from pathlib import Path

import pytest
import torch

import fastflamingo
from fastflamingo import info, models, testing
from fastflamingo.models._patching import ORIGINAL_ATTR
from fastflamingo.ops import KERNEL_FAMILIES

ROOT = Path(__file__).resolve().parent.parent
NAMES = models.names()


def _tiny(name):
    try:
        return testing.tiny_model(name)
    except ModuleNotFoundError as exc:  # an upstream package of the family is not installed
        pytest.skip(str(exc))


def test_every_family_is_a_package_that_exports_its_entry():
    assert len(set(NAMES)) == len(NAMES) == len(models.FAMILIES)
    for family in models.FAMILIES:
        package = getattr(models, family.name)
        assert package.__name__ == family.package and package.FAMILY is family
        assert (ROOT / "fastflamingo" / "models" / family.name / "rules.py").is_file()
        assert family.replaces and family.model_classes
        assert set(family.ops) <= set(KERNEL_FAMILIES), family.ops
    assert {op for family in models.FAMILIES for op in family.ops} == set(KERNEL_FAMILIES)


def test_family_lookup_names_the_registered_families():
    assert models.family("mllama") is models.mllama.FAMILY
    with pytest.raises(ValueError, match="family='llava'.*openflamingo"):
        models.family("llava")
    with pytest.raises(ValueError, match="family='llava'"):
        testing.tiny_model("llava")


@pytest.mark.parametrize("name", NAMES)
def test_patch_and_unpatch_serve_every_family(name):
    """The family's tiny upstream model is patched with the family's own drop-ins (only the classes its entry
    names) and unpatched back to the upstream classes."""
    family = models.family(name)
    model = _tiny(name)
    before = {path: type(m) for path, m in model.named_modules()}
    report = fastflamingo.patch(model)
    assert report.replaced and set(report.counts()) <= set(family.replaces), report
    dropins = [m for m in model.modules() if getattr(m, ORIGINAL_ATTR, None) is not None]
    assert dropins and all(type(m).__module__.startswith(family.package + ".") or
                           type(m).__module__.startswith("fastflamingo.models.openflamingo.") for m in dropins)
    assert any(family.supported() == line for line in fastflamingo.patching.SUPPORTED)
    assert fastflamingo.unpatch(model) == len(report.replaced)
    assert {path: type(m) for path, m in model.named_modules()} == before


@pytest.mark.parametrize("name", NAMES)
def test_warmup_finds_every_op_of_every_family(name):
    """``warmup`` asks the registry for the op shapes of a patched model: they reach every kernel family the
    family's entry names."""
    from fastflamingo._warmup import _shapes

    family = models.family(name)
    model = _tiny(name)
    fastflamingo.patch(model)
    reached = {op for shape in _shapes(model) for op in shape.ops}
    assert reached == set(family.ops), (name, reached)


@pytest.mark.triton
def test_warmup_runs_the_mllama_kernels(device, monkeypatch):
    """Llama 3.2 Vision is warmed too: the prefill kernels settle their launch configs for the model's heads and
    group, and the decode kernel and the gated projections run, without touching the model."""
    from fastflamingo.kernels import gated_linear, mllama_xattn

    pytest.importorskip("transformers")
    model = testing.tiny_mllama("sdpa", hidden_size=128).to(device)  # head_dim 16: the kernels' smallest
    fastflamingo.patch(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for chooser in (mllama_xattn.FWD_CHOOSER, gated_linear.FWD_CHOOSER):
        monkeypatch.setattr(chooser, "cache", {})
        monkeypatch.setattr(chooser, "sources", {})
    calls = []
    real = fastflamingo.models.mllama.warm.mllama_xattn
    monkeypatch.setattr(fastflamingo.models.mllama.warm, "mllama_xattn",
                        lambda q, *a, **k: calls.append(q.shape[1]) or real(q, *a, **k))
    report = fastflamingo.warmup(model, max_text=32, max_media=2, backward=False)
    assert report.calls > 0 and not report.skipped, report
    attn = model.model.language_model.layers[1].cross_attn
    group = attn.num_heads // attn.num_key_value_heads
    keys = {k[:3] for k in mllama_xattn.FWD_CHOOSER.cache}
    assert (attn.head_dim, group, attn.max_num_tiles * attn.tokens_per_tile) in keys, keys
    assert 1 in calls and 32 in calls  # a decode step and the longest prompt
    assert 128 in {k[0] for k in gated_linear.FWD_CHOOSER.cache}  # the fused GEMM's row class 17..128
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_info_prints_every_family():
    text = info.report()
    for family in models.FAMILIES:
        assert family.info_line() in text, family.name


def test_the_test_kit_builds_every_family():
    assert set(testing.TINY_MODELS) == set(NAMES)


def _table_rows(text: str, heading: str):
    """The rows of the first markdown table after ``heading`` (header and separator excluded)."""
    section = text.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return rows[2:]


def test_the_readme_table_lists_every_family():
    rows = _table_rows((ROOT / "README.md").read_text(), "### Model families")
    assert rows == [family.readme_row() for family in models.FAMILIES], "\n".join(
        ["README.md, ### Model families, should read:"] + [family.readme_row() for family in models.FAMILIES])


def test_design_md_names_every_kernel_family_and_model_family():
    text = (ROOT / "docs" / "design.md").read_text()
    missing = [stem for stem in KERNEL_FAMILIES if not re.search(rf"^\| `{stem}` \|", text, re.M)]
    missing += [f"fastflamingo/models/{name}/" for name in NAMES if f"fastflamingo/models/{name}/" not in text]
    assert not missing, f"docs/design.md does not describe {missing}"
