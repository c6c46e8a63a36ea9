"""ChannelsLast: conv weights and conv inputs in channels-last for training, evaluation, prediction and export."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_quant import ChannelsLast
from lightning_quant.demo import ConvNet, DigitsClassifier, DigitsDataModule, MLPNet
from lightning_quant.memory_format import to_channels_last

CL = torch.channels_last


class TwoChannelConvNet(nn.Module):
    """ConvNet on (image, 1 - image): its first conv gets a 2-channel NCHW input (a 1-channel one is
    trivially channels-last already)."""

    def __init__(self) -> None:
        super().__init__()
        self.convnet = ConvNet(in_channels=2, channels=8, blocks=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convnet(torch.cat([x, 1 - x], dim=1))


class InputLayoutProbe(DigitsClassifier):
    """Records, per trainer stage, whether the first conv received a channels-last input."""

    def __init__(self) -> None:
        super().__init__(TwoChannelConvNet())
        self.seen: dict[str, set[bool]] = {}
        # a forward hook sees the arguments after the forward pre-hooks changed them
        self.net.convnet.features[0][0].register_forward_hook(self._record)

    def _record(self, conv, args, output):
        stage = self.trainer.state.stage.value if self._trainer is not None else "outside"
        self.seen.setdefault(stage, set()).add(args[0].is_contiguous(memory_format=CL))


def make_trainer(tmp_path, callbacks):
    return L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        limit_test_batches=2,
        limit_predict_batches=2,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A conv net fitted, tested from its best checkpoint and used for prediction with ChannelsLast."""
    tmp_path = tmp_path_factory.mktemp("channels_last")
    L.seed_everything(0)
    model, datamodule = InputLayoutProbe(), DigitsDataModule(batch_size=32)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    trainer = make_trainer(tmp_path, [ChannelsLast(), checkpoint])
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, ckpt_path="best")
    predictions = trainer.predict(model, datamodule=datamodule)
    return model, predictions


def test_every_stage_feeds_the_convs_channels_last(fitted):
    model, predictions = fitted
    assert model.seen == {
        "sanity_check": {True},
        "train": {True},
        "validate": {True},
        "test": {True},
        "predict": {True},
    }
    assert len(predictions) == 2


def test_conv_weights_stay_channels_last_after_loading_the_best_checkpoint(fitted):
    model, _ = fitted
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(conv.weight.is_contiguous(memory_format=CL) for conv in convs)
    assert not all(conv.weight.is_contiguous() for conv in convs)  # really converted, not 1x1 trivia


def test_outputs_and_gradients_match_the_contiguous_model():
    torch.manual_seed(0)
    contiguous = ConvNet(channels=8, blocks=2)
    channels_last = copy.deepcopy(contiguous)
    assert to_channels_last(channels_last) == ["features.0.0", "features.1.0"]
    assert to_channels_last(channels_last) == ["features.0.0", "features.1.0"]  # again: nothing changes
    assert all(len(conv._forward_pre_hooks) == 1 for conv in channels_last.modules() if isinstance(conv, nn.Conv2d))
    x = torch.rand(6, 1, 8, 8)
    out_a, out_b = contiguous(x), channels_last(x)
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    out_a.sum().backward()
    out_b.sum().backward()
    torch.testing.assert_close(
        contiguous.features[0][0].weight.grad, channels_last.features[0][0].weight.grad, rtol=1e-4, atol=1e-5
    )


def test_the_channels_last_model_exports_with_any_batch_size(tmp_path):
    model = ConvNet(channels=8, blocks=2).eval()
    to_channels_last(model)
    x = torch.rand(4, 1, 8, 8)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
    path = tmp_path / "convnet.pt2"
    torch.export.save(program, path)
    reloaded = torch.export.load(path).module()
    for batch in (2, 7):
        x = torch.rand(batch, 1, 8, 8)
        torch.testing.assert_close(reloaded(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_model_without_conv2d_gets_a_warning_and_is_left_alone(tmp_path):
    model = DigitsClassifier(MLPNet(hidden=32))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, [ChannelsLast()])
    with pytest.warns(UserWarning, match="has no nn.Conv2d"):
        trainer.validate(model, datamodule=DigitsDataModule(batch_size=32))
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
