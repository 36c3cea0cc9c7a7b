"""Load-time drop-ins: transformers builds fastflamingo's layers itself, while ``from_pretrained`` / ``from_config``
build the model.

::

    from fastflamingo.hf import load
    with load.dropins():                                 # or load.register_dropins() ... load.unregister_dropins()
        model = MllamaForConditionalGeneration.from_pretrained(path, device_map="cpu")

The route is transformers' own class-replacement mechanism (``transformers.monkey_patching``, documented as
experimental): :func:`register_dropins` registers, for every upstream class that ``fastflamingo.patch`` replaces in
a family living in transformers (mllama, IDEFICS, Idefics2: ``Family.replaces``), a *factory* under that class
name. While a model is built, transformers puts the factory in place of the class in its modeling modules, so the
model's constructor calls the factory with the upstream constructor arguments, and the factory returns fastflamingo's
drop-in, built directly: no upstream module is ever constructed (on meta or elsewhere), weights are loaded straight
into the drop-ins (meta-device init, ``device_map``, quantizers replacing the drop-ins' ``nn.Linear`` children,
``keep_in_fp32``: all transformers' own, as for any module). The model equals ``fastflamingo.patch`` after loading:
same module classes, state_dict, outputs and options.

A factory returns an instance of another class, so two class-level questions need an answer:

- ``isinstance(m, <upstream name>)`` inside transformers while the factory stands in (``_init_weights`` zeroing
  mllama's gates, IDEFICS's alpha initializer, output recorders): the factory's metaclass answers True for the
  drop-in *and* for the upstream class. transformers rewrites the class-level ``_can_record_outputs`` of the model
  classes to name the factory, for good (``patch_output_recorders``); since the factory matches both, models built
  later without drop-ins still record their layers' outputs.
- what the whole model knows and a layer does not: the mllama drop-ins are built from the *text* config and do not
  know the vision tile size, IDEFICS's model-level mask hook belongs on ``IdeficsModel``, and transformers'
  ``_init_weights`` must reach a drop-in later (weights missing from a checkpoint) as it reaches an upstream layer.
  These are set when the drop-in's subtree is attached to the model being built, through torch's global
  module-registration hook, active only while drop-ins are registered (:func:`_attached`): the mllama tile size
  from the ``vision_model`` beside the language model (as ``patch`` reads it; ``MllamaForCausalLM`` has none: Llama
  3.2's 1601 x 4, as ``patch``), ``model_mask.install`` on ``IdeficsModel``, and an ``_init_weights`` router on each
  enclosing ``PreTrainedModel``. Nothing is asked of the user.

``fastflamingo.unpatch`` on such a model builds the upstream module for each drop-in (on meta, adopting the very
same Parameters: the reverse of ``patch``), so the result is what loading without drop-ins gives; ``patch`` on it
is a no-op, as on a patched model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import threading
import weakref
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from torch import nn

from ..models import FAMILIES, idefics, idefics2, mllama
from ..models._patching import ORIGINAL_ATTR, RECIPE_ATTR, InitThroughOriginals, build
from ..models.idefics import model_mask
from ..models.idefics2 import resampler as idefics2_resampler
from ..models.mllama import mask as mllama_mask
from ..models.mllama.rules import vision_sizes
from ._dropins import complete_idefics_layer, complete_mllama_layer

@dataclasses.dataclass(frozen=True)
class _Spec:
    """One upstream class transformers builds, and how its drop-in is built from the same constructor call."""

    family: str
    module: str  # the transformers module that defines the upstream class
    dropin: type
    build: Callable[..., nn.Module]  # build(options, *upstream constructor args) -> drop-in


def _mllama_layer(options: "Options", config, layer_idx, **kwargs) -> nn.Module:
    layer = mllama.MllamaCrossAttentionDecoderLayer(config, layer_idx, empty_rows=options.empty_rows, **kwargs)
    return complete_mllama_layer(layer, config)


def _mllama_attention(options: "Options", config=None, layer_idx=None, **kwargs) -> nn.Module:
    return mllama.MllamaTextCrossAttention(config, layer_idx, **kwargs)


def _idefics_layer(options: "Options", config, layer_idx=None) -> nn.Module:
    return complete_idefics_layer(idefics.IdeficsGatedCrossAttentionLayer(config, layer_idx=layer_idx), config)


def _same_signature(dropin: type) -> Callable[..., nn.Module]:
    return lambda options, *args, **kwargs: dropin(*args, **kwargs)


_MLLAMA = "transformers.models.mllama.modeling_mllama"
_IDEFICS2 = "transformers.models.idefics2.modeling_idefics2"
SPECS: Dict[str, _Spec] = {
    "MllamaCrossAttentionDecoderLayer": _Spec("mllama", _MLLAMA, mllama.MllamaCrossAttentionDecoderLayer,
                                              _mllama_layer),
    "MllamaTextCrossAttention": _Spec("mllama", _MLLAMA, mllama.MllamaTextCrossAttention, _mllama_attention),
    "IdeficsGatedCrossAttentionLayer": _Spec("idefics", "transformers.models.idefics.modeling_idefics",
                                             idefics.IdeficsGatedCrossAttentionLayer, _idefics_layer),
    "IdeficsPerceiverResampler": _Spec("idefics", "transformers.models.idefics.perceiver",
                                       idefics.IdeficsPerceiverResampler,
                                       _same_signature(idefics.IdeficsPerceiverResampler)),
    "IdeficsPerceiverAttention": _Spec("idefics", "transformers.models.idefics.perceiver",
                                       idefics.IdeficsPerceiverAttention,
                                       _same_signature(idefics.IdeficsPerceiverAttention)),
    "Idefics2PerceiverLayer": _Spec("idefics2", _IDEFICS2, idefics2.Idefics2PerceiverLayer,
                                    _same_signature(idefics2.Idefics2PerceiverLayer)),
    "Idefics2PerceiverAttention": _Spec("idefics2", _IDEFICS2, idefics2.Idefics2PerceiverAttention,
                                        _same_signature(idefics2.Idefics2PerceiverAttention)),
}
# every class patch() replaces in a family that lives in transformers has a spec (tests/test_load_time.py)
TRANSFORMERS_FAMILIES = ("mllama", "idefics", "idefics2")


@dataclasses.dataclass(frozen=True)
class Options:
    """What :func:`register_dropins` was asked for: ``empty_rows`` as ``fastflamingo.patch``'s."""

    empty_rows: str = "hf"


_lock = threading.RLock()
_active: Optional[Options] = None  # the registered options; None when no drop-ins are registered
_registration_hook = None  # the handle of torch's global module-registration hook while registered
_factories: Dict[str, type] = {}  # one factory class per upstream class name, made once
# modules that hold a drop-in built at load time (the drop-ins included), weakly: what _attached finishes
_holders: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def upstream_class(name: str) -> type:
    """The transformers class ``name`` (never a factory standing in for it while a model is built)."""
    found = getattr(importlib.import_module(SPECS[name].module), name)
    return getattr(found, "_upstream", found)


class _FactoryMeta(type(nn.Module)):
    """The metaclass of a factory: ``isinstance`` / ``issubclass`` answer for the drop-in and the upstream class."""

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, (cls._dropin, cls._upstream))

    def __subclasscheck__(cls, sub) -> bool:
        return sub is cls or issubclass(sub, (cls._dropin, cls._upstream))


def _factory(name: str) -> type:
    """The class transformers calls instead of ``name`` while a model is built: its ``__new__`` returns the
    drop-in (``__init__`` is then never run, the object not being a factory instance)."""
    with _lock:
        if name in _factories:
            return _factories[name]
        spec = SPECS[name]

        def __new__(cls, *args, **kwargs):
            options = _active or Options()
            dropin = spec.build(options, *args, **kwargs)
            # the constructor call, kept so that unpatch can build the upstream module this drop-in stands for
            dropin.__dict__[RECIPE_ATTR] = _Recipe(name, args, kwargs)
            _holders.add(dropin)
            return dropin

        factory = _FactoryMeta(name, (nn.Module,), {
            "__new__": __new__, "__module__": __name__, "__qualname__": name,
            "_dropin": spec.dropin, "_upstream": upstream_class(name),
            "__doc__": f"Builds fastflamingo's {spec.dropin.__module__}.{spec.dropin.__qualname__} where "
                       f"transformers builds {spec.module}.{name} (fastflamingo.hf.register_dropins).",
        })
        _factories[name] = factory
        return factory


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """Builds the upstream module a load-time drop-in stands for (``fastflamingo.unpatch``): the upstream class with
    the constructor arguments transformers gave the factory, on meta, adopting the drop-in's tensors, hooks and
    train mode (``models/_patching.py``, ``build``)."""

    name: str
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]

    def __call__(self, dropin: nn.Module) -> nn.Module:
        upstream = build(lambda _: upstream_class(self.name)(*self.args, **self.kwargs), dropin)
        # adopt() records the module it took the tensors from as the "original": here that is the drop-in, which
        # the upstream module must not swap back to, and the recipe is the drop-in's, not the upstream module's
        for attr in (ORIGINAL_ATTR, RECIPE_ATTR):
            upstream.__dict__.pop(attr, None)
        return upstream


def is_load_time_dropin(module: nn.Module) -> bool:
    """Whether transformers built ``module`` as a drop-in at load time (no upstream module stood before it)."""
    return RECIPE_ATTR in module.__dict__ and getattr(module, ORIGINAL_ATTR, None) is None


# --------------------------------------------------------------------------------------------------------------
# the whole model: tile sizes, model-level hooks, _init_weights
# --------------------------------------------------------------------------------------------------------------


class InitLoadTimeDropins(InitThroughOriginals):
    """``_init_weights`` of a ``PreTrainedModel`` holding load-time drop-ins: upstream's method dispatches on its
    classes by name (``isinstance(module, IdeficsGatedCrossAttentionLayer)``), so for a load-time drop-in it runs
    with those names pointing at the factories (which match the drop-in) in the method's own module, for that call
    only. A drop-in ``patch`` swapped in later goes through its original, as ``InitThroughOriginals`` does (and
    ``unpatch`` removes this router with ``patch``'s)."""

    def __call__(self, module: nn.Module):
        if not is_load_time_dropin(module):
            return super().__call__(module)
        init = type(self.owner)._init_weights
        names = {name: _factory(name) for name, spec in SPECS.items() if isinstance(module, spec.dropin)}
        scope = init.__globals__
        saved = {name: scope[name] for name in names if name in scope}
        scope.update({name: factory for name, factory in names.items() if name in saved})
        try:
            return init(self.owner, module)
        finally:
            scope.update(saved)


def _finish(model: nn.Module) -> None:
    """What a drop-in cannot know from its constructor, set on the module that now holds it."""
    if callable(getattr(type(model), "_init_weights", None)):
        current = model.__dict__.get("_init_weights")
        if not isinstance(current, InitLoadTimeDropins):
            model.__dict__["_init_weights"] = InitLoadTimeDropins(model)
    if type(model).__name__ == "IdeficsModel":
        model_mask.install(model)
    if type(model).__name__ == "Idefics2PerceiverResampler":  # once its layers are there (attached before norm)
        idefics2_resampler.install(model)
    vision = model._modules.get("vision_model")
    if vision is not None and type(vision).__name__ == "MllamaVisionModel":
        tokens_per_tile, max_num_tiles = vision_sizes(vision)
        for module in model.modules():
            if isinstance(module, mllama.MllamaTextCrossAttention):
                module.tokens_per_tile, module.max_num_tiles = tokens_per_tile, max_num_tiles


def _attached(parent: nn.Module, name: str, child) -> None:
    """torch's global module-registration hook (``parent.name = child``), active while drop-ins are registered:
    a module receiving a subtree that holds a load-time drop-in holds one too, and is finished (:func:`_finish`);
    so is every later attachment to it (its vision model may come after its language model)."""
    if not _holders or not isinstance(child, nn.Module):
        return None
    if child in _holders:
        _holders.add(parent)
    if parent in _holders:
        _finish(parent)
    return None


# --------------------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------------------


def _mapping_api():
    from transformers import monkey_patching

    return monkey_patching


def _check_options(empty_rows: str) -> Options:
    return Options(empty_rows=mllama_mask._check_empty_rows(empty_rows))


def register_dropins(*, empty_rows: str = "hf") -> Tuple[str, ...]:
    """From now on, transformers builds fastflamingo's drop-ins instead of the upstream layers ``fastflamingo.patch``
    replaces (mllama and IDEFICS) in every model it builds (``from_pretrained``, ``from_config``, and a model
    class's constructor, whose submodels transformers builds through ``from_config``), until
    :func:`unregister_dropins`. Returns the upstream class names registered.

    ``empty_rows`` (mllama): as ``fastflamingo.patch``'s. Registering again replaces the options. Raises
    ValueError when another library registered its own replacement for one of these classes (transformers keeps
    one per name).
    """
    global _active, _registration_hook
    options = _check_options(empty_rows)
    monkey_patching = _mapping_api()
    with _lock:
        registered = monkey_patching.get_patch_mapping()
        foreign = {name: cls for name, cls in registered.items() if name in SPECS and cls is not _factory(name)}
        if foreign:
            raise ValueError("transformers already replaces " + ", ".join(
                f"{name} with {cls.__module__}.{cls.__qualname__}" for name, cls in foreign.items())
                + " (transformers.monkey_patching); unregister it before fastflamingo.hf.register_dropins()")
        monkey_patching.register_patch_mapping({name: _factory(name) for name in SPECS}, overwrite=True)
        _active = options
        if _registration_hook is None:
            _registration_hook = nn.modules.module.register_module_module_registration_hook(_attached)
    return tuple(SPECS)


def unregister_dropins() -> Tuple[str, ...]:
    """Undo :func:`register_dropins`: models built from now on get the upstream layers again (models already built
    keep their drop-ins; ``fastflamingo.unpatch`` turns those back). Returns the names unregistered (none when
    nothing was registered)."""
    global _active, _registration_hook
    monkey_patching = _mapping_api()
    with _lock:
        ours = [name for name, cls in monkey_patching.get_patch_mapping().items()
                if name in SPECS and cls is _factories.get(name)]
        if ours:
            monkey_patching.unregister_patch_mapping(ours)
        _active = None
        if _registration_hook is not None:
            _registration_hook.remove()
            _registration_hook = None
    return tuple(ours)


def registered_options() -> Optional[Options]:
    """The options of the drop-ins registered now, None when none are."""
    return _active


@contextlib.contextmanager
def dropins(*, empty_rows: str = "hf") -> Iterator[Options]:
    """:func:`register_dropins` for the ``with`` block; what was registered before (nothing, or other options) is
    registered again on exit."""
    before = _active
    register_dropins(empty_rows=empty_rows)
    try:
        yield _active
    finally:
        if before is None:
            unregister_dropins()
        else:
            register_dropins(empty_rows=before.empty_rows)


def replaced_by_transformers_families() -> Dict[str, Tuple[str, ...]]:
    """The upstream classes ``patch`` replaces, per family that lives in transformers (the registry's answer)."""
    return {family.name: family.replaces for family in FAMILIES if family.name in TRANSFORMERS_FAMILIES}


__all__ = ["register_dropins", "unregister_dropins", "dropins", "registered_options", "is_load_time_dropin",
           "upstream_class", "replaced_by_transformers_families", "Options", "SPECS"]
