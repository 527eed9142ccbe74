"""Model specifications: a model is declared as *data*, never as code or pickles.

The master publishes a spec (a small JSON/CBOR/TOML-friendly mapping) and every slave
builds the same `torch.nn.Module` from it. Because the spec can only name allowlisted
layers with numeric arguments, a config message can never make a slave import or run
anything. Two forms exist:

* ``{"arch": "mlp", "sizes": [64, 128, 10], "seed": 0}`` — a named architecture from the
  registry (`register_arch`); the remaining keys are that architecture's arguments.
* ``{"layers": [{"type": "Linear", "in_features": 64, "out_features": 128}, ...],
  "seed": 0}`` — an `nn.Sequential` of allowlisted layers.

With ``seed`` the builder calls `torch.manual_seed(seed)` first, so the master and every
slave start from bit-identical initial weights without shipping them.

Updates, snapshots and aggregation all work on `float_state(model)`: the floating-point
entries of the state dict (parameters and float buffers such as BatchNorm running
statistics; integer counters like ``num_batches_tracked`` are left out).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fedmq.common.errors import ConfigError, ProtocolError, Reason
from fedmq.common.tensors import all_finite

# Argument kinds. Values are restricted to numbers, booleans and lists of ints so that a
# spec cannot smuggle anything that a layer could interpret as code or a file name.
INT, FLOAT, BOOL, INTS = "int", "float", "bool", "int or list of int"

_POOL = {"kernel_size": INTS, "stride": INTS, "padding": INTS, "ceil_mode": BOOL}
_CONV = {
    "in_channels": INT, "out_channels": INT, "kernel_size": INTS, "stride": INTS,
    "padding": INTS, "dilation": INTS, "groups": INT, "bias": BOOL,
}
_BATCHNORM = {
    "num_features": INT, "eps": FLOAT, "momentum": FLOAT, "affine": BOOL,
    "track_running_stats": BOOL,
}

#: layer type -> (torch.nn class, {argument name: kind})
ALLOWED_LAYERS: dict[str, tuple[type[nn.Module], dict[str, str]]] = {
    "Linear": (nn.Linear, {"in_features": INT, "out_features": INT, "bias": BOOL}),
    "Conv1d": (nn.Conv1d, _CONV),
    "Conv2d": (nn.Conv2d, _CONV),
    "ReLU": (nn.ReLU, {"inplace": BOOL}),
    "GELU": (nn.GELU, {}),
    "Tanh": (nn.Tanh, {}),
    "Sigmoid": (nn.Sigmoid, {}),
    "LeakyReLU": (nn.LeakyReLU, {"negative_slope": FLOAT, "inplace": BOOL}),
    "Dropout": (nn.Dropout, {"p": FLOAT, "inplace": BOOL}),
    "Flatten": (nn.Flatten, {"start_dim": INT, "end_dim": INT}),
    "Unflatten": (nn.Unflatten, {"dim": INT, "unflattened_size": INTS}),
    "MaxPool2d": (nn.MaxPool2d, {**_POOL, "dilation": INTS}),
    "AvgPool2d": (nn.AvgPool2d, {**_POOL, "count_include_pad": BOOL}),
    "BatchNorm1d": (nn.BatchNorm1d, _BATCHNORM),
    "BatchNorm2d": (nn.BatchNorm2d, _BATCHNORM),
    "LayerNorm": (nn.LayerNorm, {
        "normalized_shape": INTS, "eps": FLOAT, "elementwise_affine": BOOL, "bias": BOOL,
    }),
    "Embedding": (nn.Embedding, {
        "num_embeddings": INT, "embedding_dim": INT, "padding_idx": INT, "max_norm": FLOAT,
        "norm_type": FLOAT, "scale_grad_by_freq": BOOL,
    }),
    "Identity": (nn.Identity, {}),
    "Softmax": (nn.Softmax, {"dim": INT}),
    "LogSoftmax": (nn.LogSoftmax, {"dim": INT}),
}

ArchBuilder = Callable[..., list[dict[str, Any]]]
_ARCHS: dict[str, ArchBuilder] = {}


def register_arch(name: str) -> Callable[[ArchBuilder], ArchBuilder]:
    """Register a named architecture.

    A builder takes the spec's remaining keys as keyword arguments and returns a list of
    layer specs (the ``layers`` form), so named architectures pass through exactly the
    same allowlist as hand-written ones. Builders raise `ValueError` naming the argument
    for semantic mistakes; `build_model` turns that into a `ConfigError`.
    """

    def decorator(builder: ArchBuilder) -> ArchBuilder:
        if name in _ARCHS:
            raise ValueError(f"architecture {name!r} is already registered")
        _ARCHS[name] = builder
        return builder

    return decorator


def registered_archs() -> list[str]:
    """Names usable as ``arch`` in a spec."""
    return sorted(_ARCHS)


def _positive_ints(name: str, values: Any, min_len: int) -> list[int]:
    if (not isinstance(values, (list, tuple)) or len(values) < min_len
            or not all(_is_int(v) and v > 0 for v in values)):
        raise ValueError(f"{name}: expected a list of at least {min_len} positive ints, "
                         f"got {values!r}")
    return list(values)


@register_arch("mlp")
def mlp(sizes: Sequence[int], dropout: float = 0.0, relu_last: bool = False) -> list[dict[str, Any]]:
    """Linear/ReLU stack: ``sizes=[64, 128, 10]`` is Linear(64,128), ReLU, Linear(128,10).

    With ``dropout > 0`` a Dropout follows every ReLU. No activation after the last layer
    (the trainer applies cross-entropy to the logits) unless ``relu_last``: a shared
    encoder (``[multitask]``) ends with one, so its heads get features, not logits.
    """
    sizes = _positive_ints("sizes", sizes, min_len=2)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: must be in [0, 1), got {dropout!r}")
    if not isinstance(relu_last, bool):
        raise ValueError(f"relu_last: expected true or false, got {relu_last!r}")
    layers: list[dict[str, Any]] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append({"type": "Linear", "in_features": n_in, "out_features": n_out})
        if i < len(sizes) - 2 or relu_last:
            layers.append({"type": "ReLU"})
            if dropout > 0:
                layers.append({"type": "Dropout", "p": dropout})
    return layers


@register_arch("cnn_small")
def cnn_small(image_size: int = 28, num_classes: int = 10,
              channels: Sequence[int] = (16, 32)) -> list[dict[str, Any]]:
    """Small CNN for square one-channel images (8×8 digits, 28×28 MNIST).

    Each entry of ``channels`` is a stage Conv3×3(padding 1) → ReLU → MaxPool2. Inputs may
    be flat (N, H·W) or images (N, 1, H, W): the model starts with Flatten then Unflatten,
    both views, so the same spec serves CSV/npz rows and image tensors.
    """
    (image_size,) = _positive_ints("image_size", [image_size], min_len=1)
    (num_classes,) = _positive_ints("num_classes", [num_classes], min_len=1)
    channels = _positive_ints("channels", channels, min_len=1)
    side = image_size // 2 ** len(channels)
    if side < 1:
        raise ValueError(f"channels: {len(channels)} pooling stages shrink a "
                         f"{image_size}×{image_size} image to nothing")
    layers: list[dict[str, Any]] = [
        {"type": "Flatten", "start_dim": 1},
        {"type": "Unflatten", "dim": 1, "unflattened_size": [1, image_size, image_size]},
    ]
    for c_in, c_out in zip([1, *channels], channels):
        layers += [
            {"type": "Conv2d", "in_channels": c_in, "out_channels": c_out,
             "kernel_size": 3, "padding": 1},
            {"type": "ReLU"},
            {"type": "MaxPool2d", "kernel_size": 2},
        ]
    layers += [
        {"type": "Flatten"},
        {"type": "Linear", "in_features": channels[-1] * side * side,
         "out_features": num_classes},
    ]
    return layers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_value(path: str, value: Any, kind: str) -> Any:
    """Return `value` converted for the torch constructor, or raise naming `path`."""
    if kind == BOOL and isinstance(value, bool):
        return value
    if kind == INT and _is_int(value):
        return value
    if kind == FLOAT and (_is_int(value) or isinstance(value, float)):
        return float(value)
    if kind == INTS:
        if _is_int(value):
            return value
        if isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):
            return tuple(value)
    raise ConfigError(f"{path}: expected {kind}, got {value!r}")


def _build_layer(path: str, layer: Any) -> nn.Module:
    if not isinstance(layer, Mapping):
        raise ConfigError(f"{path}: expected a table with a 'type' key, got {layer!r}")
    layer_type = layer.get("type")
    if layer_type not in ALLOWED_LAYERS:
        raise ConfigError(f"{path}.type: {layer_type!r} is not an allowed layer "
                          f"(allowed: {', '.join(sorted(ALLOWED_LAYERS))})")
    cls, arg_kinds = ALLOWED_LAYERS[layer_type]
    kwargs = {}
    for key, value in layer.items():
        if key == "type":
            continue
        if key not in arg_kinds:
            allowed = ", ".join(sorted(arg_kinds)) or "none"
            raise ConfigError(f"{path}.{key}: not an argument of {layer_type} "
                              f"(allowed: {allowed})")
        kwargs[key] = _check_value(f"{path}.{key}", value, arg_kinds[key])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. missing or negative size
        raise ConfigError(f"{path}: cannot build {layer_type}: {exc}") from exc


def sequential(layers: Any, path: str = "model.layers") -> nn.Sequential:
    """Build an `nn.Sequential` from a list of allowlisted layer specs."""
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ConfigError(f"{path}: expected a non-empty list of layers")
    return nn.Sequential(*(_build_layer(f"{path}[{i}]", layer) for i, layer in enumerate(layers)))


def _arch_layers(spec: Mapping[str, Any], path: str) -> list[dict[str, Any]]:
    name = spec["arch"]
    if name not in _ARCHS:
        raise ConfigError(f"{path}.arch: unknown architecture {name!r} "
                          f"(known: {', '.join(registered_archs())})")
    builder = _ARCHS[name]
    params = inspect.signature(builder).parameters
    kwargs = {k: v for k, v in spec.items() if k not in ("arch", "seed")}
    for key, value in kwargs.items():
        if key not in params:
            raise ConfigError(f"{path}.{key}: not an argument of arch {name!r} "
                              f"(allowed: {', '.join(params)})")
        if not (isinstance(value, (bool, int, float))
                or isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)):
            raise ConfigError(f"{path}.{key}: expected a number, bool or list of ints, "
                              f"got {value!r}")
    for key, param in params.items():
        if param.default is inspect.Parameter.empty and key not in kwargs:
            raise ConfigError(f"{path}.{key}: required by arch {name!r}")
    try:
        return builder(**kwargs)
    except ValueError as exc:  # builders name the argument at the start of the message
        raise ConfigError(f"{path}.{exc}") from exc


def build_model(spec: Mapping[str, Any], path: str = "model") -> nn.Module:
    """Build the model a spec declares; `path` prefixes error messages (config key)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{path}: expected a table, got {type(spec).__name__}")
    if ("arch" in spec) == ("layers" in spec):
        raise ConfigError(f"{path}: give exactly one of 'arch' or 'layers'")
    if "layers" in spec:
        extra = sorted(set(spec) - {"layers", "seed"})
        if extra:
            raise ConfigError(f"{path}.{extra[0]}: unknown key (allowed: layers, seed)")
        layers, layers_path = spec["layers"], f"{path}.layers"
    else:
        layers = _arch_layers(spec, path)
        layers_path = f"{path}(arch={spec['arch']}).layers"
    seed = spec.get("seed")
    if seed is not None:
        if not _is_int(seed) or seed < 0:
            raise ConfigError(f"{path}.seed: expected a non-negative int, got {seed!r}")
        torch.manual_seed(seed)
    return sequential(layers, layers_path)


def float_state(model: nn.Module) -> dict[str, Tensor]:
    """The floating-point entries of `model.state_dict()` — the space updates live in.

    The tensors share storage with the model (as `state_dict` does); clone before
    mutating the model if a snapshot is needed.
    """
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def validate_state_dict(model: nn.Module, tensors: Mapping[str, Any]) -> None:
    """Check that untrusted `tensors` fit `float_state(model)` exactly, or raise.

    Names, shapes and dtypes must match (`Reason.BAD_TENSOR`), and every value must be
    finite (`Reason.NON_FINITE`), so a bad update is rejected before it can touch the
    model or poison an aggregate.
    """
    validate_tensors(float_state(model), tensors)


def validate_tensors(expected: Mapping[str, Tensor], tensors: Mapping[str, Any]) -> None:
    """`validate_state_dict` against reference tensors (e.g. some parts of a model)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ProtocolError(Reason.BAD_TENSOR,
                            f"tensor names differ from the model: missing {missing}, "
                            f"unexpected {unexpected}")
    for name, ref in expected.items():
        value = tensors[name]
        if not isinstance(value, Tensor):
            raise ProtocolError(Reason.BAD_TENSOR, f"{name}: not a tensor")
        if value.dtype != ref.dtype or value.shape != ref.shape:
            raise ProtocolError(Reason.BAD_TENSOR,
                                f"{name}: {value.dtype} {tuple(value.shape)}, expected "
                                f"{ref.dtype} {tuple(ref.shape)}")
        if not all_finite(value):
            raise ProtocolError(Reason.NON_FINITE, f"{name}: contains NaN or Inf")


def probe_input(model: nn.Module, batch: int = 2) -> Tensor | None:
    """A zero batch of the input the model's first layer takes, to check how specs fit
    together (a student against its teacher, a head against its encoder); None if the
    first layer does not say (a convolution takes any image size)."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            return torch.zeros(batch, layer.in_features)
        if isinstance(layer, nn.Unflatten) and layer.dim == 1:
            return torch.zeros(batch, int(torch.Size(layer.unflattened_size).numel()))
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Embedding, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            return None
    return None


def load_float_state(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Validate `tensors` against `model` and copy them in (integer buffers untouched)."""
    validate_state_dict(model, tensors)
    model.load_state_dict(dict(tensors), strict=False)
