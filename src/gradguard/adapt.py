"""Model adaptation: the ``torch.nn.Module`` gradguard hooks for a model given in another framework.

The bottom of the stack next to :mod:`gradguard.stats`: ``gg.watch`` and ``gg.probe`` call :func:`as_module`
on what they are given, and nothing here imports a framework (a Keras model can only exist once Keras is
imported, so the Keras-specific code imports it on first use).

Keras 3 on the PyTorch backend: every Keras layer is a ``torch.nn.Module`` and every Keras ``Variable``
wraps a ``torch.nn.Parameter`` (``variable.value``), so gradients land in ``param.grad`` as usual. Two things
still stand in the way of a torch tool (measured with Keras 3.15):

* **Names.** ``keras_model.named_modules()`` lists no layers, only ``ParameterDict``s, and parameters are
  called ``_functional._torch_params.sequential/lstm1/lstm_cell/kernel``.
* **Hooks.** Keras calls layers through its own ``Layer.__call__``, never ``nn.Module.__call__``, so torch
  forward hooks registered on a Keras layer never fire.

:func:`torch_view` answers both: it builds a small ``nn.Module`` tree that mirrors the Keras layer tree with
the user's layer names (``lstm1``, ``lstm1.kernel``, ``out.bias``), registers the *same* ``Parameter``
objects (so ``p.grad`` is Keras's gradient and nothing is copied), and routes each layer's ``call`` through
its mirror module so that forward hooks fire. Keras recurrent layers (``LSTM``, ``GRU``, ``SimpleRNN``,
any ``keras.layers.RNN``) become :class:`KerasRecurrent` modules that own their cell's weights, like
``torch.nn.LSTM`` does, and declare ``gradguard_recurrent = True`` and ``batch_first = True``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from gradguard.errors import InputError, StateError


def is_keras_model(obj: object) -> bool:
    """True if ``obj`` is a Keras 3 layer or model (decided from its class hierarchy, without importing Keras)."""
    return any(cls.__module__.startswith("keras.") and cls.__name__ == "Layer" for cls in type(obj).__mro__)


def as_module(model: Any) -> nn.Module:
    """The ``torch.nn.Module`` gradguard should hook for ``model``.

    A Keras 3 model (PyTorch backend) becomes its :func:`torch_view` (readable names, working forward hooks,
    the same parameters); anything else is returned unchanged. ``gg.watch`` and ``gg.probe`` call this, so
    Keras models can be passed to them directly.
    """
    return torch_view(model) if is_keras_model(model) else model


def model_arguments(inputs: Any, *, name: str = "inputs") -> tuple[list[Any], dict[str, Any]]:
    """``(args, kwargs)`` such that ``model(*args, **kwargs)`` runs the model on the batch ``inputs``.

    A tensor or a ``PackedSequence`` (a tuple subclass, not to be unpacked) is the one positional argument;
    a tuple or list holds the positional arguments; a mapping holds the keyword arguments. Anything else,
    or arguments with no tensor among them, raise :class:`InputError` naming ``name``: a batch must carry
    data.
    """
    if isinstance(inputs, Tensor | PackedSequence):
        args, kwargs = [inputs], {}
    elif isinstance(inputs, Mapping):
        args, kwargs = [], dict(inputs)
    elif isinstance(inputs, tuple | list):
        args, kwargs = list(inputs), {}
    else:
        args, kwargs = [], {}
    if not any(isinstance(v, Tensor | PackedSequence) for v in (*args, *kwargs.values())):
        shown = " ".join(repr(inputs).split())
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise InputError(
            f"{name} must be a tensor, a tuple/list of the model's positional arguments or a mapping of its "
            f"keyword arguments, holding at least one tensor; got {type(inputs).__name__} {shown}"
        )
    return args, kwargs


def call_model(model: nn.Module, inputs: Any, *, name: str = "inputs") -> Any:
    """``model(*args, **kwargs)`` with the arguments :func:`model_arguments` reads from ``inputs``."""
    args, kwargs = model_arguments(inputs, name=name)
    return model(*args, **kwargs)


#: Attribute under which a Keras model keeps its view, so repeated calls reuse one tree and one patch.
_VIEW_ATTR = "_gradguard_torch_view"


def _safe(name: str) -> str:
    # torch forbids "." in child and parameter names; Keras names may not contain "/" but can contain ".".
    return name.replace(".", "_").replace("/", "_") or "_"


def _sublayers(layer: Any) -> list[Any]:
    import keras

    if isinstance(layer, keras.Model) and hasattr(layer, "layers"):
        subs = list(layer.layers)
    else:
        # ``_flatten_layers`` is Keras's own traversal (also behind ``Layer.layers``); direct children only.
        subs = list(layer._flatten_layers(include_self=False, recursive=False))
    return [s for s in subs if not isinstance(s, keras.layers.InputLayer)]


class KerasLayer(nn.Module):
    """The torch mirror of one Keras layer: its own variables as parameters/buffers, sublayers as children.

    Calling it calls the Keras layer's ``call`` (after any forward hooks' pre-processing), so torch hooks
    registered on it observe the Keras layer's inputs and outputs.
    """

    keras_layer: Any
    _keras_call: Any
    _entered_from: str | None

    def __init__(self, layer: Any, weights: list[Any], children: list[tuple[str, Any]]) -> None:
        super().__init__()
        # Plain attribute, not a submodule: the Keras layer is an nn.Module too, and registering it would
        # bring back its unreadable ParameterDicts.
        object.__setattr__(self, "keras_layer", layer)
        object.__setattr__(self, "_keras_call", None)
        object.__setattr__(self, "_entered_from", None)
        names = [_safe(v.name) for v in weights]
        if len(set(names)) != len(names):
            names = [_safe(v.path) for v in weights]
        for name, variable in zip(names, weights, strict=True):
            value = variable.value
            if variable.trainable and isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            else:
                self.register_buffer(name, value, persistent=False)
        for name, sub in children:
            self.add_module(name, sub)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._entered_from == "keras":
            # Keras's Layer.__call__ is running and called the routed ``call``: run the layer's own code.
            return self._keras_call(*args, **kwargs)
        # Called from torch (``view(x)``): go through Keras's Layer.__call__ (input conversion, masks, the
        # training flag), telling the routed ``call`` not to come back here — the hooks already ran.
        object.__setattr__(self, "_entered_from", "torch")
        try:
            return self.keras_layer(*args, **self._keras_kwargs(kwargs))
        finally:
            object.__setattr__(self, "_entered_from", None)

    def _keras_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return kwargs

    def extra_repr(self) -> str:
        return f"keras={type(self.keras_layer).__name__}({self.keras_layer.name!r})"


class KerasRecurrent(KerasLayer):
    """Mirror of a Keras recurrent layer (``keras.layers.RNN`` and its subclasses ``LSTM``, ``GRU``, ...).

    Owns its cell's weights directly (``lstm1.kernel``, ``lstm1.recurrent_kernel``, ``lstm1.bias``), as
    ``torch.nn.LSTM`` does. Keras sequences are (batch, time, features), hence ``batch_first = True``.
    Keras lays weights out differently from torch (``kernel`` is (input, 4·units), gate order i, f, c, o,
    one bias), so tools that re-run torch's LSTM equations on the weights do not apply to it.
    """

    gradguard_recurrent = True
    batch_first = True


class KerasModel(KerasLayer):
    """Root of a :func:`torch_view`: calling it calls the Keras model.

    ``training`` follows torch's flag (``view.train()`` / ``view.eval()``) unless passed explicitly.
    """

    def _keras_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if getattr(self.keras_layer, "_call_has_training_arg", False) and "training" not in kwargs:
            return {**kwargs, "training": self.training}
        return kwargs

    def restore(self) -> None:
        """Undo the routing of Keras ``call``s through the mirror modules (hooks stop firing)."""
        for module in self.modules():
            if isinstance(module, KerasLayer) and module._keras_call is not None:
                vars(module.keras_layer).pop("call", None)
                object.__setattr__(module, "_keras_call", None)
        vars(self.keras_layer).pop(_VIEW_ATTR, None)


def _is_concrete(args: tuple[Any, ...]) -> bool:
    # Keras traces layers symbolically (KerasTensors, or torch tensors on the "meta" device) to infer
    # shapes; hooks must not see those passes, their values do not exist.
    for a in args:
        if isinstance(a, Tensor):
            return a.device.type != "meta"
        if isinstance(a, (list, tuple)) and a:
            return _is_concrete(tuple(a))
        return False
    return False


def _route(layer: Any, mirror: KerasLayer) -> None:
    original = layer.call  # the bound method, captured once

    def call(*args: Any, **kwargs: Any) -> Any:
        if mirror._entered_from is not None or not _is_concrete(args):
            return original(*args, **kwargs)
        object.__setattr__(mirror, "_entered_from", "keras")
        try:
            return mirror(*args, **kwargs)  # nn.Module.__call__: runs hooks, then mirror.forward → original
        finally:
            object.__setattr__(mirror, "_entered_from", None)

    object.__setattr__(mirror, "_keras_call", original)
    # object.__setattr__ bypasses Keras's attribute tracking (which would refuse new state on a built layer);
    # an instance attribute shadows the class's ``call`` method for Keras's own ``Layer.__call__``.
    object.__setattr__(layer, "call", call)


def _mirror(layer: Any, root: bool) -> KerasLayer:
    import keras

    recurrent = isinstance(layer, keras.layers.RNN)
    if recurrent:
        # The cell holds the weights; fold them into the recurrent module itself.
        weights, children = list(layer.weights), []
    else:
        subs = _sublayers(layer)
        owned = {id(v) for s in subs for v in s.weights}
        weights = [v for v in layer.weights if id(v) not in owned]
        children = [(_safe(s.name), _mirror(s, root=False)) for s in subs]
    cls = KerasModel if root else KerasRecurrent if recurrent else KerasLayer
    mirror = cls(layer, weights, children)
    # The root is routed too, so hooks on the view itself (a monitor's per-step forward pre-hook) fire when
    # Keras calls the model in ``fit``.
    _route(layer, mirror)
    return mirror


def torch_view(model: Any) -> KerasModel:
    """A ``torch.nn.Module`` tree mirroring a built Keras model, with readable names and working hooks.

    The mirror registers the Keras variables' own ``torch.nn.Parameter`` objects (nothing is copied; a
    gradient Keras computes is the mirror's gradient), names children after the Keras layers and
    parameters after the Keras variables (``lstm1.kernel``, ``out.bias``), and routes each layer's ``call``
    through its mirror so torch forward hooks fire during ``model.fit``, ``model(x)`` and ``view(x)``.
    Calling the view calls the Keras model. Repeated calls return the same view; :meth:`KerasModel.restore`
    undoes the routing.

    Args:
        model: a built Keras 3 model or layer (``keras.Input`` given, or called once on data).

    Raises:
        InputError: ``model`` is not a Keras layer/model.
        StateError: Keras is not on the PyTorch backend, or the model is not built.

    Example::

        os.environ["KERAS_BACKEND"] = "torch"
        view = torch_view(keras_model)
        mon = gg.watch(view)            # or gg.watch(keras_model): it calls torch_view itself
        [n for n, _ in view.named_parameters()]  # ['lstm1.kernel', 'lstm1.recurrent_kernel', ...]
    """
    if not is_keras_model(model):
        raise InputError(f"torch_view needs a Keras 3 model or layer, got {type(model).__name__}")
    import keras  # already imported: the model is a Keras layer

    if keras.backend.backend() != "torch":
        raise StateError(
            f"gradguard's Keras support needs the PyTorch backend, Keras runs on {keras.backend.backend()!r}; "
            "set KERAS_BACKEND=torch before importing keras"
        )
    if not model.built:
        raise StateError(
            f"Keras model {model.name!r} is not built: give it a keras.Input(...) or call it once on data first"
        )
    cached = vars(model).get(_VIEW_ATTR)
    if isinstance(cached, KerasModel):
        return cached
    view = _mirror(model, root=True)
    assert isinstance(view, KerasModel)  # internal invariant of _mirror(root=True)
    object.__setattr__(model, _VIEW_ATTR, view)
    return view


__all__ = [
    "KerasLayer",
    "KerasModel",
    "KerasRecurrent",
    "as_module",
    "call_model",
    "is_keras_model",
    "model_arguments",
    "torch_view",
]


def unwrap_compiled(model: nn.Module) -> tuple[nn.Module, bool]:
    """``(module holding the parameters, whether model is a torch.compile wrapper)``.

    ``torch.compile(m)`` returns an ``OptimizedModule`` whose parameters are named ``_orig_mod.*``;
    the monitor and the probe name, hook and measure ``m`` itself.
    """
    wrapped = False
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing can be compiled yet
    while eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        model, wrapped = model._orig_mod, True
    return model, wrapped
