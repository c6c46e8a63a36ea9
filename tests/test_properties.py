"""Property-based tests (hypothesis) of the core functions and the callbacks' argument checks.

Expensive things happen once: one export per module (torch_export and ONNX, no AOTInductor); hypothesis draws
batch sizes and inputs against it. Model-building properties keep ``max_examples`` small.
"""

from __future__ import annotations

import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_quant import (
    AutoMixedPrecision,
    DynamicQuantization,
    OptimizeForInference,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_quant.demo import MLPNet
from lightning_quant.export import FORMATS, export, load_artifact
from lightning_quant.export.onnx import OrtDynamicQuantization
from lightning_quant.quantization import (
    OBSERVERS,
    DynamicQuantConfig,
    ModelInputs,
    QuantizationError,
    StaticQuantConfig,
    count_quantized_ops,
    quantize,
)

# database=None: no .hypothesis/ directory in the repo. Properties over models (numerics) are derandomized,
# so the suite is reproducible; the argument checks explore new values on every run.
CHEAP = settings(max_examples=60, deadline=None, database=None)
MODELS = settings(
    max_examples=12, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

CALLBACKS = [PostTrainingQuantization, DynamicQuantization, QuantizationAwareTraining, OptimizeForInference]
CALLBACKS_WITH_OBSERVER = [PostTrainingQuantization, QuantizationAwareTraining]
CALLBACKS_WITH_KEEP_FLOAT = [PostTrainingQuantization, DynamicQuantization, QuantizationAwareTraining]

names = st.text(alphabet=string.ascii_letters + string.digits + "_.-", max_size=12)
not_a_string = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.booleans(), st.binary(max_size=4))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-6))


# ---------------------------------------------------------------------------------------------- quantize
@MODELS
@given(
    batch=st.integers(1, 48),
    in_features=st.integers(2, 96),
    hidden=st.integers(2, 96),
    layers=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_dynamic_int8_mlp_of_any_shape_matches_float_and_quantizes_every_linear(
    batch, in_features, hidden, layers, seed
):
    torch.manual_seed(seed)
    model = MLPNet(in_features=in_features, hidden=hidden, layers=layers).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(batch, in_features)

    int8 = quantize(model, DynamicQuantConfig(), x)

    assert count_quantized_ops(int8) == {"Linear (Int8Tensor)": layers + 1}
    with torch.no_grad():
        expected, actual = model(x), int8(x)
    assert actual.shape == expected.shape == (batch, 10)
    assert relative_error(actual, expected) < 0.05
    # the float model is left as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@MODELS
@given(layers=st.integers(1, 3), data=st.data())
def test_keep_float_leaves_exactly_the_named_linears_float(layers, data):
    model = MLPNet(in_features=8, hidden=16, layers=layers).eval()
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    kept = data.draw(st.lists(st.sampled_from(linears), unique=True), label="keep_float")
    config = DynamicQuantConfig(keep_float=tuple(kept))
    if len(kept) == len(linears):  # nothing left to quantize: an error that says so, naming keep_float
        with pytest.raises(QuantizationError, match="produced no quantized op.*keep_float"):
            quantize(model, config, torch.zeros(2, 8))
        return
    int8 = quantize(model, config, torch.zeros(2, 8))
    assert sum(count_quantized_ops(int8).values()) == len(linears) - len(kept)
    for name in kept:
        assert type(int8.get_submodule(name).weight) is torch.nn.Parameter  # a plain float weight


# ---------------------------------------------------------------------------------------------- ModelInputs
class TwoInputs(torch.nn.Module):
    def forward(self, x, y=None, *, scale=1.0):
        return x * scale + (0 if y is None else y.sum(dim=1, keepdim=True))


@CHEAP
@given(
    batch=st.integers(1, 8),
    width=st.integers(1, 5),
    y_by_keyword=st.booleans(),
    x_by_keyword=st.booleans(),
    scale=st.one_of(st.none(), st.floats(-4, 4, allow_nan=False)),
    container=st.sampled_from(["tuple", "list"]),
)
def test_any_way_of_passing_inputs_binds_to_one_canonical_call(
    batch, width, y_by_keyword, x_by_keyword, scale, container
):
    model = TwoInputs()
    x, y = torch.randn(batch, width), torch.randn(batch, 3)
    args, kwargs = [], {}
    if x_by_keyword:
        kwargs["x"] = x
        kwargs["y"] = y  # once one is a keyword, the next must be one too
    else:
        args.append(x)
        (kwargs.__setitem__("y", y) if y_by_keyword else args.append(y))
    if scale is not None:
        kwargs["scale"] = scale
    value = kwargs if not args else (tuple(args) if container == "tuple" else list(args))
    if args and kwargs:
        value = ModelInputs(tuple(args), kwargs)

    bound = ModelInputs.from_value(value).bind(model.forward)

    assert bound.args[0] is x and bound.args[1] is y and len(bound.args) == 2
    assert bound.kwargs == {"scale": 1.0 if scale is None else scale}
    assert bound.batch_size() == batch and len(bound.tensors()) == 2
    assert torch.equal(bound(model), model(x, y, scale=bound.kwargs["scale"]))
    assert bound.bind(model.forward) == bound  # canonical form is a fixed point
    assert torch.equal(bound.map(lambda t: t * 2).args[0], 2 * x)


@CHEAP
@given(extra=st.lists(st.floats(allow_nan=False), min_size=3, max_size=4))
def test_binding_more_arguments_than_forward_takes_is_a_type_error(extra):
    with pytest.raises(TypeError):
        ModelInputs.from_value(tuple(extra)).bind(TwoInputs().forward)


# ---------------------------------------------------------------------------------------------- export / load
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = MLPNet(in_features=12, hidden=32).eval()
    example = torch.randn(4, 12)
    int8 = quantize(model, DynamicQuantConfig(), example)
    out = tmp_path_factory.mktemp("exported")
    artifacts = export(
        int8, example, ["torch_export", "onnx"], out, float_model=model, onnx_quantization=OrtDynamicQuantization()
    )
    loaded = {a.format: (load_artifact(out / a.path, a.format), a) for a in artifacts}
    return model, int8, loaded


@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(batch=st.integers(1, 256), seed=st.integers(0, 2**16), scale=st.floats(0.01, 100))
def test_exported_files_accept_any_batch_size_and_agree_with_the_model(exported, batch, seed, scale):
    model, int8, loaded = exported
    x = torch.randn(batch, 12, generator=torch.Generator().manual_seed(seed)) * scale
    with torch.no_grad():
        expected_int8, expected_float = int8(x), model(x)
    program, _ = loaded["torch_export"]
    # the same int8 program as the in-memory model: the same numbers
    torch.testing.assert_close(program(x), expected_int8, rtol=1e-5, atol=1e-6)
    session, artifact = loaded["onnx"]  # re-quantized by ONNX Runtime: compared with float within its tolerance
    actual = torch.as_tensor(session(x))
    assert actual.shape == (batch, 10)
    assert relative_error(actual, expected_float) <= artifact.tolerance


@CHEAP
@given(formats=st.lists(names, min_size=1, max_size=3).filter(lambda fs: any(f not in FORMATS for f in fs)))
def test_export_refuses_unknown_formats_before_writing_anything(exported, tmp_path_factory, formats):
    _, int8, _ = exported
    out = tmp_path_factory.getbasetemp() / "never-created"
    with pytest.raises(ValueError, match="Unknown export format") as error:
        export(int8, torch.zeros(2, 12), formats, out)
    assert all(name in str(error.value) for name in FORMATS)
    assert not out.exists()


@CHEAP
@given(format=names.filter(lambda f: f not in FORMATS))
def test_load_artifact_refuses_unknown_formats(format):
    with pytest.raises(ValueError, match="Unknown export format") as error:
        load_artifact("model.bin", format)
    assert all(name in str(error.value) for name in FORMATS)


# ---------------------------------------------------------------------------------------------- arguments
@CHEAP
@given(callback=st.sampled_from(CALLBACKS), data=st.data())
def test_any_list_of_supported_formats_constructs(callback, data):
    formats = data.draw(st.lists(st.sampled_from(callback.supported_formats), min_size=1, unique=True))
    assert callback(formats=formats).formats == formats


@CHEAP
@given(callback=st.sampled_from(CALLBACKS), data=st.data())
def test_any_unsupported_format_is_refused_with_the_allowed_ones(callback, data):
    supported = callback.supported_formats
    formats = data.draw(
        st.lists(st.one_of(st.sampled_from(supported), names), min_size=1, max_size=4).filter(
            lambda fs: any(f not in supported for f in fs)
        )
    )
    with pytest.raises(ValueError) as error:
        callback(formats=formats)
    assert all(name in str(error.value) for name in supported), str(error.value)


@CHEAP
@given(callback=st.sampled_from(CALLBACKS), data=st.data())
def test_formats_that_are_not_a_list_of_strings_are_a_type_error_naming_the_allowed_ones(callback, data):
    formats = data.draw(
        st.one_of(
            st.sampled_from(callback.supported_formats),  # a bare string, not a list
            names,
            st.lists(not_a_string, min_size=1, max_size=3),
            st.lists(st.sampled_from(callback.supported_formats), max_size=2).flatmap(lambda fs: st.just(fs + [None])),
        )
    )
    with pytest.raises(TypeError) as error:
        callback(formats=formats)
    assert all(name in str(error.value) for name in callback.supported_formats), str(error.value)


@CHEAP
@given(callback=st.sampled_from(CALLBACKS), format=st.sampled_from(FORMATS))
def test_a_format_listed_twice_is_refused(callback, format):
    if format not in callback.supported_formats:
        format = callback.supported_formats[0]
    with pytest.raises(ValueError, match="twice"):
        callback(formats=[format, format])


@pytest.mark.parametrize("callback", CALLBACKS)
def test_an_empty_format_list_is_refused_naming_the_allowed_ones(callback):
    with pytest.raises(ValueError, match="formats is empty.*would export nothing") as error:
        callback(formats=[])
    assert all(name in str(error.value) for name in callback.supported_formats)


@CHEAP
@given(
    make=st.sampled_from([*CALLBACKS_WITH_OBSERVER, StaticQuantConfig]),
    observer=st.one_of(names, not_a_string).filter(lambda o: o not in OBSERVERS),
)
def test_any_unknown_observer_is_refused_with_the_allowed_ones(make, observer):
    with pytest.raises(ValueError) as error:
        make(observer=observer)
    assert all(name in str(error.value) for name in OBSERVERS)


@CHEAP
@given(make=st.sampled_from([*CALLBACKS_WITH_OBSERVER, StaticQuantConfig]), observer=st.sampled_from(OBSERVERS))
def test_every_known_observer_constructs(make, observer):
    made = make(observer=observer)
    assert (made.config if hasattr(made, "config") else made).observer == observer


@CHEAP
@given(
    make=st.sampled_from([*CALLBACKS_WITH_KEEP_FLOAT, StaticQuantConfig, DynamicQuantConfig]),
    keep_float=st.one_of(
        names,
        st.lists(st.one_of(names, not_a_string), min_size=1, max_size=3).filter(
            lambda ks: not all(isinstance(k, str) for k in ks)
        ),
    ),
)
def test_keep_float_that_is_not_a_list_of_names_is_a_type_error_with_an_example(make, keep_float):
    with pytest.raises(TypeError, match=r"keep_float must be a list of module names.*\['net.head'\]"):
        make(keep_float=keep_float)


@CHEAP
@given(
    make=st.sampled_from([*CALLBACKS_WITH_KEEP_FLOAT, StaticQuantConfig, DynamicQuantConfig]),
    keep_float=st.lists(names, max_size=3),
)
def test_any_list_of_names_is_accepted_as_keep_float(make, keep_float):
    # which names exist is checked at setup, against the module
    made = make(keep_float=keep_float)
    assert list(made.keep_float) == keep_float


@CHEAP
@given(count=st.one_of(st.integers(max_value=0), st.booleans(), st.floats(allow_nan=False), st.text(max_size=3)))
def test_num_calibration_batches_must_be_a_positive_integer(count):
    with pytest.raises(ValueError, match="num_calibration_batches must be a positive integer"):
        PostTrainingQuantization(num_calibration_batches=count)


@CHEAP
@given(start=st.integers(0, 20), freeze=st.integers(-5, 25))
def test_qat_freeze_epochs_before_the_start_are_refused(start, freeze):
    if freeze >= start:
        assert QuantizationAwareTraining(start_epoch=start, freeze_bn_epoch=freeze).freeze_bn_epoch == freeze
    else:
        with pytest.raises(ValueError, match=r"freeze_bn_epoch must be None \(never\) or an integer >= start_epoch"):
            QuantizationAwareTraining(start_epoch=start, freeze_bn_epoch=freeze)


@CHEAP
@given(dtype=names.filter(lambda d: d not in ("auto", "bf16", "fp16")), steps=st.integers(-3, 3))
def test_automixedprecision_refuses_unknown_dtypes_and_negative_steps_naming_the_allowed(dtype, steps):
    with pytest.raises(MisconfigurationException, match="use 'auto'.*'bf16'.*'fp16'"):
        AutoMixedPrecision(dtype=dtype)
    if steps < 0:
        with pytest.raises(MisconfigurationException, match="integer >= 0"):
            AutoMixedPrecision(measure_steps=steps)
    else:
        assert AutoMixedPrecision(measure_steps=steps).measure_steps == steps


@CHEAP
@given(dtype=names.filter(lambda d: d not in ("auto", "float32", "bfloat16")))
def test_optimize_for_inference_refuses_unknown_dtypes_naming_the_allowed(dtype):
    with pytest.raises(ValueError, match="use 'auto', 'float32' or 'bfloat16'"):
        OptimizeForInference(dtype=dtype)


def test_automixedprecision_refuses_a_list_dtype_naming_the_allowed():
    with pytest.raises(MisconfigurationException, match="use 'auto'"):
        AutoMixedPrecision(dtype=["bf16"])
