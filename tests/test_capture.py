"""``capture``: models torch.export cannot take as written (Lightning's demo Transformer, a pinned batch, a branch
on the data) are captured with what a careful engineer would change, and say so; the rest fail naming the line."""

import pytest
import torch
from lightning.pytorch.demos import Transformer
from torch import nn

from lightning_quant.capture import CaptureError, capture
from lightning_quant.inputs import ModelInputs


def tokens(batch: int, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(batch))


def test_lightnings_demo_transformer_captures_with_its_causal_mask_check_resolved_and_checked(capfd):
    model = Transformer(vocab_size=50, ninp=16, nhead=2, nhid=32, nlayers=1).eval()
    model(tokens(2), tokens(2))  # as training does: its first call sets the mask and positional table it keeps
    captured = capture(model, ModelInputs((tokens(4), tokens(4)), {}))
    # torch.export prints the partial graph of the first, failed attempt; the console does not show it
    assert "def forward(self" not in capfd.readouterr().err
    assert captured.dynamic_batch
    assert len(captured.notes) == 1 and "transformer.py" in captured.notes[0] and "(True)" in captured.notes[0]
    with torch.no_grad():  # another batch size, same outputs as the model
        torch.testing.assert_close(captured.program.module()(tokens(3), tokens(3)), model(tokens(3), tokens(3)))


def test_an_example_of_one_is_captured_with_a_batch_any_size_can_take():
    model = nn.Linear(3, 2).eval()
    captured = capture(model, ModelInputs.from_value(torch.ones(1, 3)))
    assert captured.dynamic_batch and not captured.notes
    with torch.no_grad():
        torch.testing.assert_close(captured.program.module()(torch.ones(5, 3)), model(torch.ones(5, 3)))


class PinnedBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(4, -1).sum(1)  # the batch of 4 is written into the code


def test_a_model_that_pins_its_batch_is_captured_with_the_examples_batch_and_says_so():
    captured = capture(PinnedBatch(), ModelInputs.from_value(torch.ones(4, 3)))
    assert not captured.dynamic_batch
    assert captured.notes and captured.notes[0].startswith("the batch size is fixed to 4")


class BranchOnData(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


def test_a_branch_that_goes_both_ways_on_the_data_fails_naming_its_line():
    with pytest.raises(
        CaptureError,
        match=r"BranchOnData.forward: the branch at tests/test_capture.py:\d+ "
        r"`if x.sum\(\) > 0:` depends on the input's values",
    ):
        capture(BranchOnData(), ModelInputs.from_value(torch.ones(4, 3)))


def test_what_torch_export_prints_on_a_failed_capture_stays_off_the_console(capfd):
    with pytest.raises(CaptureError):
        capture(BranchOnData(), ModelInputs.from_value(torch.ones(4, 3)))
    assert "def forward(self" not in capfd.readouterr().err
