"""The model families fastflamingo patches, one package each, and the registry that lists them.

``fastflamingo/models/<name>/`` holds a family's drop-in modules, its mask recovery, its patch rules (``rules.py``)
and its registry entry (``family.py``: a :class:`Family` record). :data:`FAMILIES` is the one list of families:
``fastflamingo.patch`` / ``unpatch``, ``fastflamingo.warmup``, ``python -m fastflamingo.info``, the test kit
(``fastflamingo.testing.tiny_model``) and the README's model table read it, and tests/test_registry.py fails when
one of them misses a family. Adding a family is a new package and one entry here.

Importing this package needs only torch: the families recognise upstream modules by class name and structure,
and import transformers or the upstream packages only where a call needs them.
"""
from . import evolla, flamingo_pytorch, idefics, idefics2, mllama, openflamingo
from ._family import Family

FAMILIES = (openflamingo.FAMILY, flamingo_pytorch.FAMILY, idefics.FAMILY, mllama.FAMILY, evolla.FAMILY,
            idefics2.FAMILY)


def names() -> tuple:
    return tuple(f.name for f in FAMILIES)


def family(name: str) -> Family:
    """The registered family called ``name``."""
    for entry in FAMILIES:
        if entry.name == name:
            return entry
    raise ValueError(f"family={name!r}; expected one of {names()}")


__all__ = ["FAMILIES", "Family", "family", "names", "openflamingo", "flamingo_pytorch", "idefics", "mllama", "evolla",
           "idefics2"]
