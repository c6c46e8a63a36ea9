"""QuantizationAwareTraining with a real Trainer on digits / a tiny two-input module, few batches.

One module-scoped fit (QAT from epoch 1, BN then ranges frozen at epoch 2, with ModelPruning and
ModelCheckpoint) serves most tests; resume, multi-input and argument checks have their own small fits.
"""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from conftest import produced_formats, run_train_script
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import QuantizationAwareTraining, load
from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule

FIT = dict(
    accelerator="cpu",
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)


def trainer(tmp_path, callbacks, max_epochs=3, **kwargs):
    options = {**FIT, "limit_train_batches": 6, "limit_val_batches": 3, "limit_test_batches": 3, **kwargs}
    return L.Trainer(default_root_dir=tmp_path, max_epochs=max_epochs, callbacks=callbacks, **options)


def ranges(callback: QuantizationAwareTraining) -> dict[str, torch.Tensor] | None:
    if callback.qat is None:
        return None
    return {k: v for k, v in callback.qat.state_dict()["fake_quant"].items() if k.endswith(("min_val", "max_val"))}


class Recorder(Callback):
    """Snapshots of the module and of the QAT ranges at the start and end of every training epoch."""

    def __init__(self, qat: QuantizationAwareTraining) -> None:
        self.qat = qat
        self.epochs: dict[int, dict[str, dict]] = {}

    def snapshot(self, pl_module):
        return {
            "fake_quant": "forward" in vars(pl_module),
            "state": copy.deepcopy(pl_module.state_dict()),
            "ranges": copy.deepcopy(ranges(self.qat)),
        }

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs[trainer.current_epoch] = {"start": self.snapshot(pl_module)}

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs[trainer.current_epoch]["end"] = self.snapshot(pl_module)


def pruned_convs(model: DigitsClassifier) -> list[nn.Conv2d]:
    return [m for m in model.net.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1]


@pytest.fixture(scope="module")
def qat_fit(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("qat_fit")
    L.seed_everything(0)
    model = DigitsClassifier(ConvNet(channels=8))
    datamodule = DigitsDataModule(batch_size=64)
    qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=2, formats=["torch_export"])
    recorder = Recorder(qat)
    pruning = ModelPruning(
        "l1_unstructured",
        parameters_to_prune=[(conv, "weight") for conv in pruned_convs(model)],
        amount=0.5,
        apply_pruning=lambda epoch: epoch == 1,
        use_lottery_ticket_hypothesis=False,
    )
    # every epoch kept; "best" is the newest (a mid-QAT checkpoint), so the tests below do not depend on accuracy
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="step", mode="max", save_top_k=-1)
    fit_trainer = trainer(tmp_path, [qat, recorder, pruning, checkpoint])
    fit_trainer.fit(model, datamodule)
    return {
        "model": model,
        "datamodule": datamodule,
        "qat": qat,
        "recorder": recorder,
        "trainer": fit_trainer,
        "checkpoint": checkpoint,
        "tmp_path": tmp_path,
    }


def test_fake_quant_starts_at_start_epoch_and_trains_the_weights(qat_fit):
    epochs = qat_fit["recorder"].epochs
    assert [epochs[e]["start"]["fake_quant"] for e in range(3)] == [False, True, True]
    assert epochs[0]["start"]["ranges"] is None
    start, end = epochs[1]["start"], epochs[1]["end"]
    name = "net.features.1.0.weight"
    assert not torch.equal(start["state"][name], end["state"][name])  # the optimizer moves the weights under QAT
    assert any(not torch.equal(start["ranges"][k], end["ranges"][k]) for k in end["ranges"])  # ranges move
    assert qat_fit["qat"].manifest["qat"]["started_epoch"] == 1


def test_batchnorm_statistics_then_ranges_freeze(qat_fit):
    start, end = qat_fit["recorder"].epochs[2]["start"], qat_fit["recorder"].epochs[2]["end"]
    for name, value in start["state"].items():
        if name.endswith(("running_mean", "running_var")):
            assert torch.equal(value, end["state"][name]), name
    for name, value in start["ranges"].items():
        assert torch.equal(value, end["ranges"][name]), name
    assert not torch.equal(start["state"]["net.head.weight"], end["state"]["net.head.weight"])  # still training


def test_int8_model_manifest_and_pruning(qat_fit):
    qat, model = qat_fit["qat"], qat_fit["model"]
    manifest = json.loads((qat_fit["tmp_path"] / "quantized" / "manifest.json").read_text())
    assert manifest["approach"] == "qat" and manifest["qat"]["fake_quant_modules"] == qat.qat.num_fake_quantizers
    assert manifest["quantized_ops"]["aten.conv2d (int8 weight)"] == 3  # the 1-input-channel conv stays float
    assert set(manifest["metrics"]["quantized"]) == {"val/acc", "val/loss"}
    assert abs(manifest["metrics"]["quantized"]["val/acc"] - manifest["metrics"]["float"]["val/acc"]) < 0.1
    x = torch.rand(5, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        fake_quant, int8 = model(x), qat.quantized_model(x)
    model.train()
    assert (int8 - fake_quant).abs().max() <= 0.05 * fake_quant.abs().max()
    # ModelPruning (global, 50%, epoch 1) reached the int8 weights, which hold nothing else (no float copies)
    weights = [t for t in qat.quantized_model.reference.state_dict().values() if t.dim() == 4]
    assert sorted(str(w.dtype) for w in weights) == ["torch.float32"] + 3 * ["torch.int8"]  # first conv: float
    int8_weights = [w for w in weights if w.dtype == torch.int8]
    assert sum(int((w == 0).sum()) for w in int8_weights) == sum(w.numel() for w in int8_weights) // 2


def test_quantized_model_and_the_loaded_file_behave_like_modules(qat_fit):
    """User code calls .eval(), .train(False), .to("cpu") on any model, and calls it under no_grad/inference_mode: the
    QAT model is an exported program's module, which refuses train/eval; the deployed and loaded models do not."""
    x = torch.rand(5, 1, 8, 8)
    for model in (qat_fit["qat"].quantized_model, load(qat_fit["tmp_path"] / "quantized")):
        with torch.no_grad():
            expected = model(x)
        assert model.eval() is model and not model.training
        assert model.train(False) is model and model.to("cpu") is model
        with torch.inference_mode():
            assert torch.equal(model(x), expected)
        model.train()  # the flag only: the int8 model keeps computing as in eval mode
        with torch.no_grad():
            assert model.training and torch.equal(model(x), expected)
        model.eval()


def test_test_and_validate_after_fit_load_checkpoints_and_move_nothing(qat_fit):
    fit_trainer, model, qat, datamodule = qat_fit["trainer"], qat_fit["model"], qat_fit["qat"], qat_fit["datamodule"]
    results = fit_trainer.test(model, datamodule, ckpt_path="best", verbose=False)
    assert 0.0 <= results[0]["test/acc"] <= 1.0
    saved = torch.load(qat_fit["checkpoint"].best_model_path, weights_only=False)
    assert saved["epoch"] == 2
    state, qat_ranges = copy.deepcopy(model.state_dict()), copy.deepcopy(ranges(qat))
    # the module holds the checkpoint: weights (pruning made permanent in the file) and fake-quant ranges
    for name, value in saved["state_dict"].items():
        assert torch.equal(state[name], value), name
    saved_ranges = saved["callbacks"][qat.state_key]["qat"]["fake_quant"]
    for name, value in qat_ranges.items():
        assert torch.equal(value, saved_ranges[name]), name
    assert "forward" in vars(model)  # the fake-quant model: it measures what int8 computes

    fit_trainer.validate(model, datamodule, verbose=False)
    fit_trainer.test(model, datamodule, verbose=False)
    fit_trainer.predict(model, datamodule.predict_dataloader())
    with torch.no_grad():  # a forward outside any Trainer stage (summaries, setup checks, user code)
        model.eval()
        model(torch.zeros(4, 1, 8, 8))
        model.train()
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    for name, value in ranges(qat).items():
        assert torch.equal(value, qat_ranges[name]), name

    # a checkpoint from the float warm-up has no QAT state: evaluating it evaluates the float model
    checkpoints = qat_fit["tmp_path"] / "checkpoints"
    fit_trainer.validate(model, datamodule, ckpt_path=checkpoints / "epoch=0-step=6.ckpt", verbose=False)
    assert "forward" not in vars(model) and qat.qat is None
    # (that restored ModelCheckpoint's state too, so "best" would now mean epoch 0: name the file)
    fit_trainer.test(model, datamodule, ckpt_path=checkpoints / "epoch=2-step=18.ckpt", verbose=False)
    assert "forward" in vars(model)
    for name, value in ranges(qat).items():
        assert torch.equal(value, qat_ranges[name]), name


def test_arguments_are_checked_at_construction():
    with pytest.raises(ValueError, match="start_epoch must be an integer >= 0"):
        QuantizationAwareTraining(start_epoch=-1)
    with pytest.raises(ValueError, match="freeze_bn_epoch must be None .* >= start_epoch \\(3\\)"):
        QuantizationAwareTraining(start_epoch=3, freeze_bn_epoch=2)
    with pytest.raises(ValueError, match="choose one of"):
        QuantizationAwareTraining(observer="kl")
    with pytest.raises(ValueError, match="observer_enabled_stages must be a non-empty list from"):
        QuantizationAwareTraining(observer_enabled_stages=("fit",))
    with pytest.raises(ValueError, match="cannot export format"):
        QuantizationAwareTraining(formats=["torchscript"])


def test_start_epoch_beyond_the_fit_fails_before_training(tmp_path):
    model = DigitsClassifier(ConvNet(channels=4, blocks=2))
    with pytest.raises(ValueError, match="fake-quant would never start"):
        trainer(tmp_path, [QuantizationAwareTraining(start_epoch=2)], max_epochs=2).fit(model, DigitsDataModule())


# ---------------------------------------------------------------------------------------------------- resume
def ordered_digits(batch_size=32):
    datamodule = DigitsDataModule(batch_size=batch_size)
    datamodule.setup()
    return (
        DataLoader(datamodule.train_set, batch_size=batch_size),  # no shuffling: a resumed run sees the same order
        DataLoader(datamodule.val_set, batch_size=batch_size),
    )


def test_resume_mid_qat_restores_fake_quant_state_and_continues_identically(tmp_path):
    train, val = ordered_digits()
    limits = dict(limit_train_batches=4, limit_val_batches=2)

    L.seed_everything(0)
    straight = DigitsClassifier(ConvNet(channels=8, blocks=2))
    qat_straight = QuantizationAwareTraining(start_epoch=1, freeze_observer_epoch=2, quantize_on_fit_end=False)
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer(tmp_path / "a", [qat_straight, every_epoch], **limits).fit(straight, train, val)

    class AtResume(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.ranges = copy.deepcopy(ranges(qat_resumed))
            self.fake_quant = "forward" in vars(pl_module)

    L.seed_everything(1)  # another init: everything must come from the checkpoint
    resumed = DigitsClassifier(ConvNet(channels=8, blocks=2))
    qat_resumed = QuantizationAwareTraining(start_epoch=1, freeze_observer_epoch=2, quantize_on_fit_end=False)
    at_resume = AtResume()
    mid_qat = tmp_path / "ckpt" / "epoch=1.ckpt"
    trainer(tmp_path / "b", [qat_resumed, at_resume], **limits).fit(resumed, train, val, ckpt_path=mid_qat)

    saved = torch.load(mid_qat, weights_only=False)["callbacks"][qat_resumed.state_key]["qat"]["fake_quant"]
    assert at_resume.fake_quant
    for name, value in at_resume.ranges.items():
        assert torch.equal(value, saved[name]), name
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in ranges(qat_straight).items():
        torch.testing.assert_close(ranges(qat_resumed)[name], value, rtol=1e-5, atol=1e-6, msg=name)

    # quantize_on_fit_end=False: still a float-in/float-out fake-quant model, and it can be fit again
    assert qat_straight.manifest is None and "forward" in vars(straight)
    before = copy.deepcopy(straight.state_dict())
    trainer(tmp_path / "c", [qat_straight], max_epochs=1, limit_train_batches=4, limit_val_batches=0).fit(
        straight, train
    )
    assert "forward" in vars(straight)
    assert not torch.equal(before["net.head.weight"], straight.state_dict()["net.head.weight"])
    # the fit ended on a training batch; a forward outside the Trainer still moves no range
    after_fit = ranges(qat_straight)
    with torch.no_grad():
        straight.eval()
        straight(torch.zeros(4, 1, 8, 8))
    for name, value in ranges(qat_straight).items():
        assert torch.equal(value, after_fit[name]), name


# ---------------------------------------------------------------------------------------------------- inputs
class TwoInputModule(L.LightningModule):
    """forward(x, y, *, scale): two tensor inputs and a keyword-only tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.image_head = nn.Linear(8, 4)
        self.vector_head = nn.Linear(6, 4)
        self.example_input_array = {"x": torch.zeros(4, 3, 6, 6), "y": torch.zeros(4, 6), "scale": torch.tensor(1.0)}

    def forward(self, x, y, *, scale):
        return self.image_head(self.conv(x).mean(dim=(2, 3))) * scale + self.vector_head(y)

    def _loss(self, batch):
        x, y, target = batch
        return nn.functional.cross_entropy(self(x, y, scale=torch.tensor(2.0)), target)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        x, y, target = batch  # all by keyword here, positionally in training: the same exported graph serves both
        self.log("val/loss", nn.functional.cross_entropy(self(x=x, y=y, scale=torch.tensor(2.0)), target))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_forward_with_several_tensor_inputs_and_keyword_arguments(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(96, 3, 6, 6, generator=g), torch.randn(96, 6, generator=g), torch.randint(0, 4, (96,), generator=g)
    )
    module = TwoInputModule()
    qat = QuantizationAwareTraining(
        formats=["torch_export"], batch_to_input=lambda b: {"x": b[0], "y": b[1], "scale": torch.tensor(2.0)}
    )
    trainer(tmp_path, [qat], max_epochs=2).fit(module, DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    manifest = qat.manifest
    assert [t["name"] for t in manifest["input"]["tensors"]] == ["args[0]", "args[1]", "scale"]
    assert manifest["quantized_ops"] and "val/loss" in manifest["metrics"]["quantized"]
    x, y, scale = torch.randn(5, 3, 6, 6), torch.randn(5, 6), torch.tensor(2.0)
    module.eval()
    with torch.no_grad():
        expected = module(x, y, scale=scale)
    got = qat.quantized_model(x, y, scale=scale)
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


# ---------------------------------------------------------------------------------------------------- train.py
@pytest.mark.slow
def test_train_script_with_qat(tmp_path):
    """`python train.py callbacks=qat`, default formats (AOTInductor, ONNX and OpenVINO's IR), 3 epochs of digits."""
    result = run_train_script(tmp_path, "callbacks=qat", "trainer.max_epochs=3", "trainer.limit_train_batches=1.0")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "quantized" / "manifest.json").read_text())
    assert manifest["approach"] == "qat" and manifest["qat"]["started_epoch"] == 0
    assert produced_formats(manifest) == {"aoti", "onnx", "openvino"}
    assert manifest["float_checkpoint"] == "../checkpoints/last.ckpt"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.5  # tested from the best checkpoint, as the fake-quant model


# ---------------------------------------------------------------------------------------------------- short QAT, ONNX
def test_short_qat_exports_a_verified_onnx_file(tmp_path):
    L.seed_everything(0)
    qat = QuantizationAwareTraining(formats=["onnx"], dirpath=tmp_path / "quantized")
    trainer(tmp_path, [qat], max_epochs=2, limit_train_batches=3, limit_val_batches=2).fit(
        DigitsClassifier(ConvNet()), datamodule=DigitsDataModule()
    )
    # after 2 epochs x 3 batches the int8 model is nearly untrained (logits ~0.17): one quantization level
    # flipped at a rounding tie by ONNX Runtime's summation order moves the output by 3-7% of its maximum.
    # The same-program tolerance follows that measured noise floor instead of a fixed 1%.
    assert [a["format"] for a in qat.manifest["artifacts"]] == ["onnx"]
    verification = qat.manifest["artifacts"][0]["verification"]
    assert verification["relative_error"] <= verification["tolerance"]
    assert verification["tolerance"] > 0.01 and "twice the noise floor" in verification["tolerance_rule"]


# ---------------------------------------------------------------------------------------------------- mixed precision
def test_qat_trains_under_bf16_mixed_precision_and_converts(tmp_path):
    """Autocast hands fake-quant bf16 activations, which torch's fused observer + fake-quant kernel refuses:
    QAT observes and rounds them in float32 (AutoMixedPrecision picks bf16 on CPUs that compute it fast)."""
    L.seed_everything(0)
    qat = QuantizationAwareTraining(formats=["torch_export"], dirpath=tmp_path / "quantized")
    model = DigitsClassifier(ConvNet(channels=8))
    trainer(tmp_path, [qat], max_epochs=2, precision="bf16-mixed").fit(model, datamodule=DigitsDataModule())
    ranges_after_fit = ranges(qat)
    assert ranges_after_fit and all(
        torch.isfinite(v).all() and v.dtype == torch.float32 for v in ranges_after_fit.values()
    )
    assert qat.manifest["status"] == "ok" and qat.manifest["quantized_ops"]
    x = torch.rand(5, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert expected.dtype == torch.float32  # outside autocast the fake-quant model computes in float32
    assert (qat.quantized_model(x) - expected).abs().max() <= 0.05 * expected.abs().max()
