"""PostTrainingQuantization and DynamicQuantization on a real Trainer with the digits data, end to end."""

from __future__ import annotations

import hashlib
import json
import logging

import lightning as L
import pytest
import torch
from conftest import fast_trainer, produced_formats, run_train_script
from test_quantization import TwoInputs, two_inputs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import (
    DynamicQuantization,
    OptimizeForInference,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    WeightOnlyQAT,
    WeightOnlyQuantization,
)
from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule, LSTMNet, MLPNet
from lightning_quant.quantization import QuantizationError

FAST = dict(limit_train_batches=4)  # beside conftest.FAST_FIT


def fit(callback, model, tmp_path, datamodule=None, **trainer_kwargs):
    trainer = fast_trainer(
        tmp_path,
        [callback],
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="csv", version=""),
        **{**FAST, **trainer_kwargs},
    )
    trainer.fit(model, datamodule=datamodule or DigitsDataModule(batch_size=32))
    return trainer


@pytest.fixture(scope="module")
def ptq_run(tmp_path_factory):
    """One static int8 fit shared by the tests below (AOTInductor compiles take seconds)."""
    tmp_path = tmp_path_factory.mktemp("ptq")
    torch.manual_seed(0)
    callback = PostTrainingQuantization(
        num_calibration_batches=6, observer="minmax", formats=["aoti", "onnx", "torch_export"], keep_float=["net.head"]
    )
    model = DigitsClassifier(ConvNet(channels=16))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("lightning.pytorch").addHandler(handler)
    try:
        trainer = fit(callback, model, tmp_path)
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    return callback, model, trainer, tmp_path, [r.getMessage() for r in records]


def test_ptq_writes_verified_artifacts_and_a_complete_manifest(ptq_run):
    callback, model, trainer, tmp_path, _ = ptq_run
    dirpath = tmp_path / "quantized"
    manifest = json.loads((dirpath / "manifest.json").read_text())
    assert manifest == json.loads(json.dumps(callback.manifest, default=str))
    assert manifest["approach"] == "static"
    assert manifest["backend"] == "x86_inductor"
    assert manifest["versions"]["torch"].startswith("2.") and manifest["versions"]["torchao"]
    assert manifest["input"]["shape"] == [4, 1, 8, 8] and manifest["input"]["dtype"] == "float32"
    assert manifest["calibration"] == {
        "dataloader": "train",
        "batches": 6,
        "batches_requested": 6,
        "observer": "minmax",
        "per_channel_weights": True,
    }
    assert produced_formats(manifest) == {"aoti", "onnx", "torch_export"}
    for artifact in manifest["artifacts"]:
        data = (dirpath / artifact["path"]).read_bytes()
        assert artifact["bytes"] == len(data)
        assert artifact["sha256"] == hashlib.sha256(data).hexdigest()
        assert artifact["verification"]["relative_error"] <= artifact["verification"]["tolerance"]
        assert artifact["verification"]["batch_sizes"] == [4, 32]
        assert artifact["latency_ms"] > 0
    assert {f: t["compared_with"] for f, t in manifest["tolerances"].items()} == {
        "aoti": "quantized",
        "onnx": "float",
        "torch_export": "quantized",
    }
    assert manifest["tolerances"]["aoti"]["relative_error_max"] == 0.01
    assert manifest["tolerances"]["onnx"]["relative_error_max"] >= 0.1
    for kind in ("float", "quantized"):
        assert 0.0 <= manifest["metrics"][kind]["val/acc"] <= 1.0
        assert manifest["metrics"][kind]["val/loss"] > 0
        assert manifest["latency_ms"][kind] > 0
    assert manifest["size_bytes"]["quantized"] < manifest["size_bytes"]["float"]
    # the Trainer's default ModelCheckpoint keeps no "last" checkpoint: the callback wrote the float one itself
    assert manifest["float_checkpoint"] == "float.ckpt"
    assert torch.load(dirpath / "float.ckpt", weights_only=False)["global_step"] == trainer.global_step


def test_ptq_quantizes_ops_and_keeps_named_modules_float(ptq_run):
    callback, *_ = ptq_run
    # the head is kept float on request, the one-channel input conv automatically (AOTInductor bug)
    assert callback.manifest["quantized_ops"] == {"aten.conv2d (int8 weight)": 3}
    assert callback.manifest["keep_float"] == ["net.head"]
    assert any("net.features.0.0" in note for note in callback.manifest["notes"])


def test_ptq_quantized_model_is_the_lowered_int8_model_and_takes_forward_inputs(ptq_run):
    callback, model, *_ = ptq_run
    quantized = callback.quantized_model
    assert quantized.is_lowered
    x = torch.rand(7, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    for out in (quantized(x), quantized(x=x)):
        assert out.shape == (7, 10)
        assert (out.argmax(1) == expected.argmax(1)).float().mean() >= 0.7
    # it runs the fastest verified file, whichever runtime that is
    fastest = min(callback.manifest["artifacts"], key=lambda a: a["latency_ms"])
    assert (
        quantized.runtime == fastest["format"] and callback.manifest["latency_ms"]["quantized"] == fastest["latency_ms"]
    )


def test_ptq_logs_the_numbers_and_prints_one_table(ptq_run):
    callback, _, trainer, tmp_path, messages = ptq_run
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in (
        "quantization/float/val/acc",
        "quantization/quantized/val/acc",
        "quantization/float/latency_ms",
        "quantization/quantized/size_bytes",
        "quantization/onnx/latency_ms",
        "quantization/aoti/bytes",
    ):
        assert name in header
    tables = [m for m in messages if "int8 (static)" in m]
    assert len(tables) == 1
    assert "model_aoti.pt2" in tables[0] and "val/acc" in tables[0]


def test_dynamic_quantization_of_an_mlp_in_three_formats(tmp_path):
    torch.manual_seed(0)
    callback = DynamicQuantization(formats=["onnx", "torch_export", "torchscript"], keep_float=["net.layers.1"])
    fit(callback, DigitsClassifier(MLPNet()), tmp_path)
    manifest = json.loads((tmp_path / "quantized" / "manifest.json").read_text())
    assert manifest["approach"] == "dynamic"
    assert manifest["quantized_ops"] == {"Linear (Int8Tensor)": 2}
    assert produced_formats(manifest) == {"onnx", "torch_export", "torchscript"}
    assert all(a["verification"]["relative_error"] <= a["verification"]["tolerance"] for a in manifest["artifacts"])
    assert manifest["metrics"]["quantized"]["val/acc"] >= 0
    # quantized_model runs the fastest verified file, whichever runtime that is
    fastest = min(manifest["artifacts"], key=lambda a: a["latency_ms"])
    assert (
        callback.quantized_model.runtime == fastest["format"]
        and manifest["latency_ms"]["quantized"] == fastest["latency_ms"]
    )
    assert callback.quantized_model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_dynamic_quantization_of_an_lstm_says_plainly_there_is_no_speed_gain(tmp_path):
    callback = DynamicQuantization()
    fit(callback, DigitsClassifier(LSTMNet(hidden_size=32)), tmp_path)
    manifest = callback.manifest
    exported = {a["format"] for a in manifest["artifacts"]} | set(manifest.get("failures", {}))
    assert exported == {"onnx", "torchscript"}  # the defaults that can carry an int8 LSTM, for this model
    assert callback.formats == ["aoti", "onnx"]  # the callback's own setting is unchanged
    assert manifest["quantized_ops"] == {"LSTM (legacy torch.ao int8)": 1, "Linear (Int8Tensor)": 1}
    assert manifest["recurrent_layers_int8"] == ["net.lstm"]
    assert any("no speed gain" in note for note in manifest["notes"])
    with pytest.raises(ValueError, match=r"recurrent layers \['net.lstm'\].*formats \['aoti'\]"):
        fit(DynamicQuantization(formats=["aoti"]), DigitsClassifier(LSTMNet(hidden_size=32)), tmp_path / "again")


class TwoInputClassifier(L.LightningModule):
    """A LightningModule whose forward takes two tensors and a keyword-only one."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TwoInputs()
        self.example_input_array = two_inputs(4)

    def forward(self, image, side, *, scale):
        return self.net(image, side, scale=scale)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return nn.functional.cross_entropy(self(**inputs), target)

    def validation_step(self, batch, batch_idx):
        inputs, target = batch
        self.log("val/loss", nn.functional.cross_entropy(self(**inputs), target))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class TwoInputData(L.LightningDataModule):
    def _loader(self):
        torch.manual_seed(0)
        samples = [(two_inputs(1), torch.randint(0, 4, (1,))) for _ in range(64)]
        data = [({k: v[0] for k, v in inputs.items()}, target[0]) for inputs, target in samples]
        return DataLoader(data, batch_size=16)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


def test_ptq_with_several_inputs_and_a_keyword_argument(tmp_path):
    callback = PostTrainingQuantization(
        num_calibration_batches=2, observer="minmax", formats=["aoti", "onnx"], batch_to_input=lambda batch: batch[0]
    )
    torch.manual_seed(0)
    model = TwoInputClassifier()
    fit(callback, model, tmp_path, datamodule=TwoInputData())
    assert [t["name"] for t in callback.manifest["input"]["tensors"]] == ["args[0]", "args[1]", "scale"]
    assert callback.manifest["metrics"]["quantized"]["val/loss"] > 0
    batch = two_inputs(5)
    with torch.no_grad():
        expected = model(**batch)
        positional = callback.quantized_model(batch["image"], batch["side"], scale=batch["scale"])
        keywords = callback.quantized_model(**batch)
    assert torch.equal(positional, keywords)
    assert (positional - expected).abs().max() < 0.1 * expected.abs().max()


def test_a_fit_without_checkpointing_still_saves_the_float_checkpoint_first(tmp_path):
    callback = DynamicQuantization(formats=["onnx"])
    fit(callback, DigitsClassifier(MLPNet()), tmp_path, enable_checkpointing=False)
    assert (tmp_path / "quantized" / "float.ckpt").is_file()
    assert callback.manifest["float_checkpoint"] == "float.ckpt"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda: PostTrainingQuantization(formats=["tflite"]),
            ValueError,
            r"cannot export format\(s\) \['tflite'\]; choose from \['aoti', 'onnx', 'openvino', 'torch_export'\]",
        ),
        (lambda: PostTrainingQuantization(formats=["torchscript"]), ValueError, "cannot export format"),
        (lambda: PostTrainingQuantization(formats="onnx"), TypeError, "formats must be a list"),
        (lambda: PostTrainingQuantization(observer="percentile"), ValueError, r"Unknown observer 'percentile'"),
        (lambda: PostTrainingQuantization(num_calibration_batches=0), ValueError, "positive integer"),
        (lambda: PostTrainingQuantization(calibration_dataloader="test"), ValueError, r"\['train', 'val'\]"),
        (lambda: DynamicQuantization(keep_float="net.head"), TypeError, "keep_float must be a list"),
        (lambda: DynamicQuantization(formats=["onnx", "onnx"]), ValueError, "twice"),
    ],
)
def test_bad_arguments_fail_at_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


ALL_CALLBACKS = [
    PostTrainingQuantization,
    DynamicQuantization,
    QuantizationAwareTraining,
    WeightOnlyQuantization,
    WeightOnlyQAT,
    OptimizeForInference,
]


@pytest.mark.parametrize("callback", ALL_CALLBACKS)
def test_an_unknown_keyword_is_a_type_error_naming_it(callback):
    # the subclasses pass **kwargs up: the base's __init__, which takes no **kwargs, refuses a misspelling
    with pytest.raises(TypeError, match="unexpected keyword argument 'dynamic_batches'"):
        callback(dynamic_batches=False)


@pytest.mark.parametrize("callback", ALL_CALLBACKS)
def test_shared_arguments_reach_the_base_class(callback, tmp_path):
    made = callback(dirpath=tmp_path, formats=["onnx"], dynamic_batch=False, target="avx2")
    assert (made.dirpath, made.formats, made.dynamic_batch, made.target) == (tmp_path, ["onnx"], False, "avx2")
    assert made.config is None or getattr(made.config, "target", "avx2") == "avx2"


def test_keep_float_is_not_an_argument_of_optimize_for_inference_but_the_bf16_budget_is():
    with pytest.raises(TypeError, match="unexpected keyword argument 'keep_float'"):
        OptimizeForInference(keep_float=["net.head"])
    budget = OptimizeForInference(max_metric_drop={"metric": "val/acc", "max_drop": 0.01}).budget
    assert (budget.metric, budget.max_drop) == ("val/acc", 0.01)


def test_subclass_arguments_pass_through_two_levels():
    qat = WeightOnlyQAT(start_epoch=1, bits=8, group_size=64, keep_float=["net.head"], formats=["onnx"])
    assert (qat.start_epoch, qat.config.bits, qat.config.group_size) == (1, 8, 64)
    assert qat.keep_float == ["net.head"] and qat.config.keep_float == ("net.head",)
    assert WeightOnlyQAT().formats == list(WeightOnlyQuantization.default_formats)


class NoExample(DigitsClassifier):
    def __init__(self):
        super().__init__(MLPNet())
        self.example_input_array = None


class DataDependentClassifier(DigitsClassifier):
    def forward(self, x):
        if x.mean() > 0.5:  # data-dependent control flow: torch.export cannot capture it
            return self.net(x) * 2
        return self.net(x)


def test_without_an_example_input_the_first_training_batch_is_the_example(tmp_path):
    callback = DynamicQuantization(formats=["torch_export"])
    fit(callback, NoExample(), tmp_path)
    assert callback.manifest["input"]["shape"] == [32, 1, 8, 8]  # the datamodule's batch size
    assert any("first batch of the training dataloader" in note for note in callback.manifest["notes"])


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([(torch.rand(1, 8, 8), i % 10) for i in range(64)])


def test_no_example_input_and_an_iterable_dataset_fails_before_training(tmp_path):
    trainer = fast_trainer(tmp_path, [PostTrainingQuantization()])
    with pytest.raises(ValueError, match="needs an example input to export NoExample.*example_input_array"):
        trainer.fit(NoExample(), DataLoader(Stream(), batch_size=8))
    assert trainer.global_step == 0


def test_bad_keep_float_fails_at_setup(tmp_path):
    with pytest.raises(
        ValueError, match=r"keep_float names modules that DigitsClassifier does not have: \['net.tail'\]"
    ):
        fit(DynamicQuantization(keep_float=["net.tail"]), DigitsClassifier(MLPNet()), tmp_path)


def test_empty_calibration_dataloader_fails_before_training(tmp_path):
    class EmptyVal(DigitsDataModule):
        def val_dataloader(self):
            return DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)))

    model = DigitsClassifier(MLPNet())
    with pytest.raises(ValueError, match="val dataloader is empty"):
        fit(PostTrainingQuantization(calibration_dataloader="val"), model, tmp_path, datamodule=EmptyVal())
    assert model.trainer.global_step == 0


def test_unexportable_model_error_names_it_after_the_float_checkpoint_is_saved(tmp_path):
    callback = PostTrainingQuantization(num_calibration_batches=2, formats=["onnx"])
    message = r"(?s)PostTrainingQuantization failed on DataDependentClassifier.*`if x.mean\(\) > 0.5:.*` depends on the input's values.*float model is safe: "
    with pytest.raises(QuantizationError, match=message) as error:
        fit(callback, DataDependentClassifier(MLPNet()), tmp_path)
    checkpoint = tmp_path / "quantized" / "float.ckpt"
    assert str(error.value).endswith(str(checkpoint))
    assert torch.load(checkpoint, weights_only=False)["state_dict"].keys() >= {"net.layers.1.weight"}
    manifest = json.loads((tmp_path / "quantized" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "depends on the input's values" in manifest["error"]


# ---------------------------------------------------------------- train.py


def run_train(tmp_path, *overrides):
    result = run_train_script(tmp_path, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "quantized" / "manifest.json").read_text()), result


@pytest.mark.slow
def test_train_script_with_ptq(default_train_run):
    # `python train.py` as it ships: its default callbacks are conf/callbacks/ptq.yaml's (one run, shared with
    # test_avx2_emulated.py and test_target.py)
    run_dir, result = default_train_run
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((run_dir / "quantized" / "manifest.json").read_text())
    assert manifest["approach"] == "static"
    assert manifest["float_checkpoint"] == "../checkpoints/last.ckpt"  # the app's ModelCheckpoint(save_last=True)
    assert produced_formats(manifest) == {"aoti", "onnx", "openvino"}
    console = result.stdout + result.stderr
    assert "int8 (static)" in console
    # nothing that is not about the user's model or data: no dependency deprecations, adverts or checkpoint notes
    for noise in ("FutureWarning", "DeprecationWarning", "Tip: For seamless", "weights_only", "Failed to load"):
        assert noise not in console, noise


@pytest.mark.slow
def test_train_script_with_lstm_and_dynamic(tmp_path):
    manifest, _ = run_train(tmp_path, "model=lstm", "callbacks=dynamic")
    assert "test/acc" in json.loads((tmp_path / "metrics.json").read_text())  # fit, then test, in a fresh process
    assert manifest["approach"] == "dynamic"
    assert produced_formats(manifest) == {"onnx", "torchscript"}
    assert "LSTM (legacy torch.ao int8)" in manifest["quantized_ops"]
    # Hydra's job log holds what the console showed: Lightning's messages, the fit-end table, warnings
    log = (tmp_path / "train.log").read_text()
    assert "`Trainer.fit` stopped" in log and "int8 (dynamic)" in log and "model.onnx" in log
    assert "[py.warnings][WARNING]" in log and "the deprecated torch torch.ao.quantization.quantize_dynamic" in log
