"""Bad input fails with a message naming the problem and the fix, before training time is spent where possible.

Covered elsewhere: empty calibration dataloader, missing/batch-of-one example input, unknown format/observer
(tests/test_ptq_callbacks.py), a model torch.export cannot capture (same file), disk full (tests/test_reliability.py).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import fast_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import (
    DynamicQuantization,
    OptimizeForInference,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule, MLPNet
from lightning_quant.quantization import QuantizationError

FAST = dict(limit_train_batches=2)  # beside conftest.FAST_FIT


def fit(callbacks, model, tmp_path, datamodule=None):
    trainer = fast_trainer(tmp_path, callbacks, **FAST)
    trainer.fit(model, datamodule=datamodule or DigitsDataModule(batch_size=32))
    return trainer


@pytest.mark.parametrize(
    ("example", "found"),
    [
        (torch.zeros(4, 3, 8, 8), r"shape \[4, 3, 8, 8\], dtype float32"),
        (torch.zeros(4, 1, 8, 8, dtype=torch.int64), r"shape \[4, 1, 8, 8\], dtype int64"),
    ],
)
def test_example_input_of_the_wrong_shape_or_dtype_fails_at_setup(tmp_path, example, found):
    model = DigitsClassifier(ConvNet(channels=4))
    with pytest.raises(
        ValueError,
        match=rf"DigitsClassifier.forward fails on the example input \({found}\).*"
        "Pass example_input= .*shape and dtype forward takes",
    ):
        fit([PostTrainingQuantization(example_input=example)], model, tmp_path)
    assert model.trainer.global_step == 0


def test_nan_in_calibration_batches_is_named(tmp_path):
    class NanTrain(DigitsDataModule):
        def train_dataloader(self):
            images = torch.rand(64, 1, 8, 8)
            images[40, 0, 3, 3] = float("nan")
            return DataLoader(TensorDataset(images, torch.randint(0, 10, (64,))), batch_size=16)

    callback = PostTrainingQuantization(num_calibration_batches=4, formats=["onnx"])
    with pytest.raises(QuantizationError, match="Batch 2 of the train dataloader holds NaN or inf.*Clean or clip"):
        fit([callback], DigitsClassifier(MLPNet()), tmp_path, datamodule=NanTrain(batch_size=16))
    assert callback.manifest["status"] == "failed" and "NaN or inf" in callback.manifest["error"]


def test_tiny_calibration_dataloader_calibrates_on_what_there_is(tmp_path):
    class OneBatchTrain(DigitsDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))), batch_size=8)

    callback = PostTrainingQuantization(num_calibration_batches=32, formats=["torch_export"])
    with pytest.warns(
        UserWarning,
        match=r"Calibrated on 1 batch\(es\) \(8 samples\) of the train dataloader, fewer "
        r"than num_calibration_batches=32.*lower num_calibration_batches",
    ):
        fit([callback], DigitsClassifier(MLPNet()), tmp_path, datamodule=OneBatchTrain(batch_size=8))
    calibration = callback.manifest["calibration"]  # recorded, so a reader sees how little it saw
    assert (calibration["batches"], calibration["batches_requested"]) == (1, 32)
    assert any(note.startswith("Calibrated on 1 batch") for note in callback.manifest["notes"])
    assert callback.manifest["status"] == "ok"


def test_a_dirpath_that_cannot_be_written_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    model = DigitsClassifier(MLPNet())
    with pytest.raises(
        ValueError, match=r"DynamicQuantization cannot write into dirpath .*a_file/out.*pass a writable dirpath="
    ):
        fit([DynamicQuantization(dirpath=blocker / "out")], model, tmp_path)
    assert model.trainer.global_step == 0


@pytest.mark.parametrize(
    "make_second",
    [
        lambda: DynamicQuantization(),
        lambda: QuantizationAwareTraining(),
        lambda: OptimizeForInference(),  # float files into the same default dirpath
    ],
)
def test_two_quantization_callbacks_on_one_trainer_conflict(tmp_path, make_second):
    model = DigitsClassifier(MLPNet())
    with pytest.raises(
        ValueError,
        match=r"Conflicting quantization callbacks on one Trainer: \['PostTrainingQuantization', .*keep one|own dirpath",
    ):
        fit([PostTrainingQuantization(), make_second()], model, tmp_path)
    assert model.trainer.global_step == 0


def test_optimize_for_inference_beside_an_int8_callback_in_its_own_dirpath_is_allowed(tmp_path):
    ptq = PostTrainingQuantization(dirpath=tmp_path / "int8")
    optimize = OptimizeForInference(dirpath=tmp_path / "float")
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[ptq, optimize], max_epochs=0, logger=False)
    for callback in (ptq, optimize):  # setup only: both checks pass
        callback.setup(trainer, DigitsClassifier(MLPNet()), "fit")
