"""fastflamingo's layers as a Hugging Face kernel repository (``kernels``), ready to publish.

::

    python -m fastflamingo.hf.hub build OUTDIR            # OUTDIR/build/torch-universal/fastflamingo_layers/...

The repository is a *universal* build (Triton kernels and a PyTorch path: nothing compiled ahead of time), so one
variant serves every torch and device: ``build/torch-universal/`` holds ``metadata.json`` and the package
``fastflamingo_layers``, whose ``layers`` module is :mod:`fastflamingo.hf.hub_layers` inside a copy of fastflamingo
(``_fastflamingo/``: the library, its Triton kernels and tuned tables, without the test kit, the selftest and the
compile check). The copy registers its torch custom ops under the build's own namespace (the kernel id) instead of
``fastflamingo::``, so it loads beside an installed fastflamingo, and beside another build.

Using it (docs/transformers_loading.md has the whole route):

- stateless layers, any model: :func:`mark_layers` names the transformers classes (``kernel_layer_name``, through
  ``kernels.replace_kernel_forward_from_hub``: they carry no ``use_kernel_forward_from_hub``), :func:`kernel_mapping`
  maps those names to the repository's layers, and ``kernels.kernelize`` (or ``from_pretrained``, which kernelizes by
  default, and ``model.train()`` / ``eval()``, which kernelize again) swaps the forwards;
- stateful layers: :func:`kernel_config`, a transformers ``KernelConfig`` whose layouts replace the upstream classes
  while ``from_pretrained`` builds the model.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple, Union

from .._version import __version__
from .hub_layers import STATEFUL, STATELESS

NAME = "fastflamingo-layers"
PACKAGE = NAME.replace("-", "_")
VARIANT = "torch-universal"
VENDORED = "_fastflamingo"
SOURCE = Path(__file__).resolve().parent.parent  # the fastflamingo package (kernels/ through its link)
# what the repository's copy leaves out: the test kit, the selftest, the compile check, the info command and this
# builder (the copy is what the layers run; the package's __init__ imports the other routes, which import only torch)
LEFT_OUT = ("testing.py", "selftest", "aot.py", "info.py", "__pycache__")
HF_LEFT_OUT = ("hub.py",)


def _sources() -> Dict[str, bytes]:
    """{path in the copy: content} of every file the repository's copy of fastflamingo holds."""
    files = {}
    for folder, dirs, names in os.walk(SOURCE, followlinks=True):  # through the kernels link
        dirs[:] = sorted(d for d in dirs if d not in LEFT_OUT)
        for name in sorted(names):
            relative = (Path(folder) / name).relative_to(SOURCE)
            if name in LEFT_OUT or name.endswith(".pyc") or (relative.parts[0] == "hf" and name in HF_LEFT_OUT):
                continue
            files[relative.as_posix()] = (SOURCE / relative).read_bytes()
    return files


def _adapted(text: str, kernel_id: str) -> str:
    """The copy's own names: its custom ops under the build's namespace (``"fastflamingo::op"``,
    ``torch.ops.fastflamingo.op``), and the kernels' import guard naming the copy's package."""
    text = text.replace("torch.ops.fastflamingo.", f"torch.ops.{kernel_id}.")
    text = text.replace('__name__.startswith("fastflamingo.kernels.")',
                        f'__name__.startswith("{kernel_id}.{VENDORED}.kernels.")')
    return re.sub(r"([\"'])fastflamingo::", rf"\g<1>{kernel_id}::", text)


def build_id(files: Dict[str, bytes], version: int) -> str:
    """The kernel id: unique per build (``kernels`` imports a build under it, and refuses two builds with one id)."""
    digest = hashlib.sha256(str(version).encode())
    for path, content in files.items():
        digest.update(path.encode() + b"\0" + content + b"\0")
    return f"_{PACKAGE}_universal_{digest.hexdigest()[:8]}"


PACKAGE_INIT = '''"""fastflamingo {fastflamingo} as a Hugging Face kernel: fused Triton kernels and a PyTorch path
for Flamingo-style cross-attention (Llama 3.2 Vision / mllama, IDEFICS). Layers: ``layers`` (see its docstring)."""
from ._fastflamingo.hf import hub_layers as layers

__version__ = "{fastflamingo}"
'''

README = '''---
license: mit
tags:
- kernels
---
# {name}

fastflamingo {fastflamingo}'s layers for transformers' Flamingo-style models as a `kernels` repository
(a universal build: Triton kernels on CUDA, a PyTorch path elsewhere). Built by `python -m fastflamingo.hf.hub build`.

Stateless layers (`kernels.kernelize`), named after the transformers classes whose forward they replace:
{stateless}.

Stateful layers (transformers `KernelConfig`, with their `...Layout` classes):
{stateful}.

```python
import fastflamingo.hf.hub as hub
from kernels import kernelize, use_kernel_mapping, Mode

hub.mark_layers()                                   # the transformers classes carry no kernel layer name
with use_kernel_mapping(hub.kernel_mapping("ORG/{name}")):
    model = MllamaForConditionalGeneration.from_pretrained(path)     # kernelized while loading
```

Without fastflamingo installed, `kernels.replace_kernel_forward_from_hub(cls, name)` names each class (the
`IdeficsCrossAttention` layer with the condition `layers.is_cross_attention`) and the mapping is
`{{name: {{device: LayerRepository("ORG/{name}", layer_name=name, version={version})}}}}`.
'''


def build(outdir: Union[str, Path], *, version: int = 1) -> Path:
    """Write the kernel repository into ``outdir`` (created; must be empty or absent). Returns the variant folder
    (``outdir/build/torch-universal``)."""
    out = Path(outdir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"outdir={str(out)!r} is not empty: build into a new folder")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive int, got {version!r}")
    files = _sources()
    kernel_id = build_id(files, version)
    variant = out / "build" / VARIANT
    package = variant / PACKAGE
    for path, content in files.items():
        target = package / VENDORED / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.endswith(".py"):
            content = _adapted(content.decode(), kernel_id).encode()
        target.write_bytes(content)
    (package / "__init__.py").write_text(PACKAGE_INIT.format(fastflamingo=__version__))
    # a universal variant loads on every backend (its folder name decides); the metadata's (required) backend names
    # the one the Triton kernels are compiled for, and no architectures: Triton compiles for the device at hand
    metadata = {"id": kernel_id, "name": NAME, "version": version, "license": "MIT", "python-depends": [],
                "backend": {"type": "cuda"}}
    (variant / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    _add_digest(variant, metadata)
    (out / "README.md").write_text(README.format(
        name=NAME, fastflamingo=__version__, version=version, stateless=", ".join(f"`{n}`" for n in STATELESS),
        stateful=", ".join(f"`{n}`" for n in STATEFUL.values())))
    return variant


def _add_digest(variant: Path, metadata: dict) -> None:
    """The files' digest in the metadata (what ``kernels`` checks a loaded build against), when this ``kernels``
    can compute it (its hasher is private: without it the build loads with a warning that it cannot verify it)."""
    try:
        from kernels._rust import Digest, DigestAlgorithm
    except ImportError:
        return
    metadata["digest"] = {"algorithm": "sha256", "files": Digest.hash_variant(DigestAlgorithm.SHA256, variant).files}
    (variant / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------
# using the repository
# --------------------------------------------------------------------------------------------------------------


def _upstream_classes() -> Dict[str, Tuple[type, object]]:
    import importlib

    return {name: (getattr(importlib.import_module(module), cls), condition)
            for name, (module, cls, condition) in STATELESS.items()}


def mark_layers() -> Tuple[str, ...]:
    """Give the transformers classes the stateless layers replace their kernel layer names (a class attribute,
    for every model; ``kernels.replace_kernel_forward_from_hub``, its "last resort" for classes without
    ``use_kernel_forward_from_hub``). Returns the names. :func:`unmark_layers` takes them back."""
    from kernels import replace_kernel_forward_from_hub

    for name, (cls, condition) in _upstream_classes().items():
        existing = cls.__dict__.get("kernel_layer_name")
        if existing not in (None, name):
            raise ValueError(f"{cls.__module__}.{cls.__qualname__} already has the kernel layer name {existing!r}")
        replace_kernel_forward_from_hub(cls, name, condition)
    return tuple(STATELESS)


def unmark_layers() -> Tuple[str, ...]:
    """Undo :func:`mark_layers` (modules kernelized before keep their forward until kernelized again)."""
    undone = []
    for name, (cls, _) in _upstream_classes().items():
        if cls.__dict__.get("kernel_layer_name") == name:
            del cls.kernel_layer_name
            cls.__dict__.get("kernel_condition") is not None and delattr(cls, "kernel_condition")
            undone.append(name)
    return tuple(undone)


def _repository(repo: Union[str, Path], layer: str, version: int):
    """A local folder (``LocalLayerRepository``) or a Hub repository id (``LayerRepository``)."""
    from kernels import LayerRepository, LocalLayerRepository

    if isinstance(repo, Path) or Path(repo).is_dir():
        return LocalLayerRepository(repo_path=Path(repo), layer_name=layer)
    return LayerRepository(repo_id=str(repo), layer_name=layer, version=version)


def kernel_mapping(repo: Union[str, Path], *, devices: Iterable[str] = ("cuda", "rocm", "xpu", "cpu"),
                   version: int = 1) -> dict:
    """The ``kernels`` mapping of every stateless layer to ``repo`` (a built folder or a Hub id) on ``devices``,
    for ``kernels.use_kernel_mapping`` / ``register_kernel_mapping`` (every mode: the layers have a backward)."""
    devices = tuple(devices)
    return {name: {device: _repository(repo, name, version) for device in devices} for name in STATELESS}


def kernel_config(repo_id: str, *, version: int = 1, layers: Optional[Iterable[str]] = None):
    """A transformers ``KernelConfig`` for the stateful layers: ``from_pretrained(..., kernel_config=...)`` builds
    the layouts (fastflamingo's drop-ins with their caches) in place of the upstream classes ``layers`` (default:
    all of :data:`~fastflamingo.hf.hub_layers.STATEFUL`), then kernelizes them. ``repo_id`` is a Hub id (a local
    copy resolves through ``kernels``' ``LOCAL_KERNELS=repo_id=path``: transformers 5.25's ``use_local_kernel``
    fails on layouts, see docs/transformers_loading.md)."""
    from transformers import KernelConfig

    layers = tuple(STATEFUL) if layers is None else tuple(layers)
    unknown = [name for name in layers if name not in STATEFUL]
    if unknown:
        raise ValueError(f"layers={unknown}: the stateful layers are {tuple(STATEFUL)}")
    return KernelConfig({name: (f"{repo_id}:{STATEFUL[name]}", {"version": version}) for name in layers})


def unregister_layouts() -> Tuple[str, ...]:
    """transformers 5.25 leaves a ``KernelConfig``'s layouts registered after ``from_pretrained``
    (``register_patch_mapping``): every later model of those classes, with or without a kernel config, is built
    with them. This takes back the layouts of fastflamingo-layers builds; returns the class names."""
    from transformers import monkey_patching

    ours = [name for name, cls in monkey_patching.get_patch_mapping().items()
            if name in STATEFUL and cls.__name__ == f"{STATEFUL[name]}Layout" and f"_{PACKAGE}_" in cls.__module__]
    if ours:
        monkey_patching.unregister_patch_mapping(ours)
    return tuple(ours)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastflamingo.hf.hub", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="write the kernel repository into OUTDIR")
    build_parser.add_argument("outdir", type=Path)
    build_parser.add_argument("--version", type=int, default=1, help="the kernel's major version (default 1)")
    args = parser.parse_args(argv)
    variant = build(args.outdir, version=args.version)
    metadata = json.loads((variant / "metadata.json").read_text())
    repo, branch = f"ORG/{NAME}", f"v{args.version}"  # kernels resolve version=N to the branch vN
    print(f"{NAME} {metadata['id']} (fastflamingo {__version__}) in {args.outdir}\npublish:\n"
          f"  hf repos create {repo} --repo-type kernel\n"
          f"  hf repos branch create {repo} {branch} --repo-type kernel\n"
          f"  hf upload --repo-type kernel {repo} {args.outdir} . --revision {branch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
