"""The record a model family hands the rest of the library.

Each family package (``fastflamingo/models/<name>/``) exports one :class:`Family` as ``FAMILY``, and
``fastflamingo.models.FAMILIES`` lists them. Everything that must know every family reads that tuple instead of a
list of its own: ``patch`` and ``unpatch`` apply the rules and the model-level hooks, ``warmup`` asks for the op
shapes of a model's drop-ins, ``python -m fastflamingo.info`` prints :meth:`Family.info_line`, the README's model
table holds :meth:`Family.readme_row`, and the test kit (``fastflamingo.testing.tiny_model``) builds a tiny model of
each; tests/test_registry.py fails when one of them misses a family.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Callable, Iterable, Sequence, Tuple

from torch import nn

from ._patching import Rule


def no_hooks(model: nn.Module) -> int:
    """A family without model-level hooks: nothing installed, nothing removed."""
    return 0


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: the package under ``fastflamingo/models/`` and the registry key.
        upstream: the upstream package and version the drop-ins follow (``"open-flamingo 2.0.1"``).
        model_classes: the upstream model classes ``patch`` is documented for.
        replaces: the upstream module classes its rules replace (the names a ``PatchReport`` counts).
        ops: the kernel families (``fastflamingo.ops.KERNEL_FAMILIES``) its drop-ins launch.
        mask: the module that turns the family's mask into a closed form.
        rules: ``rules(model, empty_rows)``: the patch rules for ``model`` (``empty_rows`` is ``patch``'s option).
        warmup_shapes: ``warmup_shapes(module)``: the op shapes (``models/_warm.py``) one drop-in module launches.
        install_hooks, remove_hooks: model-level hooks ``patch`` adds beside the module swaps and ``unpatch``
            removes; each returns how many models it touched.
    """

    name: str
    upstream: str
    model_classes: Tuple[str, ...]
    replaces: Tuple[str, ...]
    ops: Tuple[str, ...]
    mask: types.ModuleType
    rules: Callable[[nn.Module, str], Sequence[Rule]]
    warmup_shapes: Callable[[nn.Module], Iterable[object]]
    install_hooks: Callable[[nn.Module], int] = no_hooks
    remove_hooks: Callable[[nn.Module], int] = no_hooks

    @property
    def package(self) -> str:
        return f"fastflamingo.models.{self.name}"

    def supported(self) -> str:
        """One line of ``patch``'s "nothing to patch" error: the models and the modules it replaces."""
        return f"{self.upstream} {' / '.join(self.model_classes)}: {', '.join(self.replaces)}"

    def info_line(self) -> str:
        """The family's line in ``python -m fastflamingo.info``."""
        return (f"{self.name:<17} {self.upstream} {' / '.join(self.model_classes)}; ops {', '.join(self.ops)}; "
                f"mask {self.mask.__name__}")

    def readme_row(self) -> str:
        """The family's row in the README's model table."""
        code = lambda names: ", ".join(f"`{n}`" for n in names)  # noqa: E731
        folder = f"fastflamingo/models/{self.name}/"
        return (f"| `{self.name}` | {self.upstream} {code(self.model_classes)} | {code(self.replaces)} | "
                f"{code(self.ops)} | [{folder}]({folder}) |")


__all__ = ["Family", "no_hooks"]
