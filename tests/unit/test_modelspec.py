"""Model specs: allowlist, error paths, seeded determinism, update validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmq.common.errors import ConfigError, ProtocolError, Reason
from fedmq.common.modelspec import (
    ALLOWED_LAYERS,
    build_model,
    float_state,
    load_float_state,
    registered_archs,
    validate_state_dict,
)

REFERENCE_MLP = {"arch": "mlp", "sizes": [64, 128, 10], "seed": 0}


def test_reference_mlp_matches_hand_built_sequential_bit_for_bit():
    model = build_model(REFERENCE_MLP)
    torch.manual_seed(0)
    expected = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    got, want = model.state_dict(), expected.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_layers_form_equals_arch_form():
    layers = {"seed": 0, "layers": [
        {"type": "Linear", "in_features": 64, "out_features": 128},
        {"type": "ReLU"},
        {"type": "Linear", "in_features": 128, "out_features": 10},
    ]}
    a, b = float_state(build_model(layers)), float_state(build_model(REFERENCE_MLP))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_same_seed_same_weights_different_seed_different_weights():
    a = float_state(build_model(REFERENCE_MLP))
    b = float_state(build_model(REFERENCE_MLP))
    c = float_state(build_model({**REFERENCE_MLP, "seed": 1}))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])


def test_mlp_dropout_and_structure():
    model = build_model({"arch": "mlp", "sizes": [4, 8, 8, 2], "dropout": 0.25})
    types = [type(m).__name__ for m in model]
    assert types == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert model(torch.zeros(5, 4)).shape == (5, 2)


@pytest.mark.parametrize("image_size", [8, 28])
def test_cnn_small_accepts_flat_and_image_inputs(image_size):
    model = build_model({"arch": "cnn_small", "image_size": image_size, "seed": 0})
    flat = torch.rand(3, image_size * image_size)
    out = model(flat)
    assert out.shape == (3, 10)
    assert torch.equal(out, model(flat.view(3, 1, image_size, image_size)))


def test_every_allowed_layer_builds_with_its_arguments():
    specs = [
        {"type": "Conv1d", "in_channels": 2, "out_channels": 3, "kernel_size": 3, "bias": False},
        {"type": "Conv2d", "in_channels": 1, "out_channels": 2, "kernel_size": [3, 1],
         "padding": [1, 0]},
        {"type": "GELU"}, {"type": "Tanh"}, {"type": "Sigmoid"},
        {"type": "LeakyReLU", "negative_slope": 0.1},
        {"type": "Dropout", "p": 0}, {"type": "Flatten", "start_dim": 1},
        {"type": "Unflatten", "dim": 1, "unflattened_size": [2, 2]},
        {"type": "MaxPool2d", "kernel_size": 2}, {"type": "AvgPool2d", "kernel_size": 2},
        {"type": "BatchNorm1d", "num_features": 4}, {"type": "BatchNorm2d", "num_features": 4},
        {"type": "LayerNorm", "normalized_shape": [4], "eps": 1e-6},
        {"type": "Embedding", "num_embeddings": 10, "embedding_dim": 4},
        {"type": "Identity"}, {"type": "Softmax", "dim": 1}, {"type": "LogSoftmax", "dim": -1},
    ]
    assert {s["type"] for s in specs} | {"Linear", "ReLU"} == set(ALLOWED_LAYERS)
    for spec in specs:
        assert isinstance(build_model({"layers": [spec]}), nn.Sequential)


@pytest.mark.parametrize("spec, message", [
    ({"layers": [{"type": "ReLU"}, {"type": "ReLU"}, {"type": "Eval"}]},
     "model.layers[2].type: 'Eval' is not an allowed layer (allowed: "),
    ({"layers": [{"type": "Linear", "in_features": "__import__('os')", "out_features": 2}]},
     "model.layers[0].in_features: expected int"),
    ({"layers": [{"type": "Linear", "in_features": True, "out_features": 2}]},
     "model.layers[0].in_features: expected int"),
    ({"layers": [{"type": "Linear", "in_features": 2, "out_features": 2, "device": "meta"}]},
     "model.layers[0].device: not an argument of Linear"),
    ({"layers": [{"type": "Linear", "in_features": 2}]}, "model.layers[0]: cannot build Linear"),
    ({"layers": [{"type": "Linear", "in_features": -2, "out_features": 2}]},
     "model.layers[0]: cannot build Linear"),
    ({"layers": [{"type": "Conv2d", "in_channels": 1, "out_channels": 1,
                  "kernel_size": [3, 1.5]}]}, "model.layers[0].kernel_size: expected int"),
    ({"layers": ["ReLU"]}, "model.layers[0]: expected a table"),
    ({"layers": []}, "model.layers: expected a non-empty list"),
    ({"layers": [{"type": "ReLU"}], "optimizer": 1}, "model.optimizer: unknown key"),
    ({"arch": "resnet152"}, "model.arch: unknown architecture 'resnet152'"),
    ({"arch": "mlp"}, "model.sizes: required by arch 'mlp'"),
    ({"arch": "mlp", "sizes": [64]}, "model.sizes: expected a list of at least 2"),
    ({"arch": "mlp", "sizes": [64, 10], "width": 3}, "model.width: not an argument of arch"),
    ({"arch": "mlp", "sizes": [64, 10], "dropout": "0.1"}, "model.dropout: expected a number"),
    ({"arch": "mlp", "sizes": [64, 10], "dropout": 1.0}, "model.dropout: must be in [0, 1)"),
    ({"arch": "cnn_small", "channels": [4] * 6}, "model.channels: 6 pooling stages"),
    ({"arch": "mlp", "sizes": [64, 10], "seed": -1}, "model.seed: expected a non-negative int"),
    ({"arch": "mlp", "layers": []}, "model: give exactly one of 'arch' or 'layers'"),
    ({}, "model: give exactly one of 'arch' or 'layers'"),
])
def test_bad_specs_raise_config_error_naming_the_key(spec, message):
    with pytest.raises(ConfigError) as info:
        build_model(spec)
    assert str(info.value).startswith(message), str(info.value)


def test_registered_archs_listed():
    assert {"mlp", "cnn_small"} <= set(registered_archs())


def _model_with_batchnorm():
    return build_model({"seed": 0, "layers": [
        {"type": "Linear", "in_features": 4, "out_features": 3},
        {"type": "BatchNorm1d", "num_features": 3},
    ]})


def test_float_state_leaves_out_integer_buffers():
    names = set(float_state(_model_with_batchnorm()))
    assert names == {"0.weight", "0.bias", "1.weight", "1.bias",
                     "1.running_mean", "1.running_var"}


def test_validate_accepts_matching_tensors_and_load_copies_them():
    model = _model_with_batchnorm()
    new = {k: torch.full_like(v, 0.5) for k, v in float_state(model).items()}
    load_float_state(model, new)
    assert all(torch.equal(v, new[k]) for k, v in float_state(model).items())


@pytest.mark.parametrize("mutate, reason", [
    (lambda t: t.pop("0.bias"), Reason.BAD_TENSOR),
    (lambda t: t.update(extra=torch.zeros(1)), Reason.BAD_TENSOR),
    (lambda t: t.update({"0.weight": torch.zeros(4, 3)}), Reason.BAD_TENSOR),
    (lambda t: t.update({"0.weight": torch.zeros(3, 4, dtype=torch.float64)}), Reason.BAD_TENSOR),
    (lambda t: t.update({"0.weight": [[0.0] * 4] * 3}), Reason.BAD_TENSOR),
    (lambda t: t["0.bias"].__setitem__(1, float("nan")), Reason.NON_FINITE),
    (lambda t: t["1.running_var"].__setitem__(0, float("-inf")), Reason.NON_FINITE),
])
def test_validate_rejects_bad_updates_with_reason(mutate, reason):
    model = _model_with_batchnorm()
    tensors = {k: v.clone() for k, v in float_state(model).items()}
    mutate(tensors)
    with pytest.raises(ProtocolError) as info:
        validate_state_dict(model, tensors)
    assert info.value.reason == reason


def test_load_float_state_rejects_without_touching_the_model():
    model = _model_with_batchnorm()
    before = {k: v.clone() for k, v in float_state(model).items()}
    bad = {k: torch.zeros_like(v) for k, v in before.items()}
    bad["1.running_mean"][0] = float("inf")
    with pytest.raises(ProtocolError):
        load_float_state(model, bad)
    assert all(torch.equal(v, before[k]) for k, v in float_state(model).items())
