"""Real text with no download: the Python standard library's own source files, as bytes (vocabulary 256).

Every machine that runs Python has them. The split is by file and fixed (``TRAIN_FILES`` / ``VAL_FILES`` / ``TEST_FILES``), so a
validation score is measured on text the model never saw.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

VOCAB_SIZE = 256
TRAIN_FILES = ("argparse.py", "dataclasses.py", "difflib.py", "inspect.py", "pathlib.py", "textwrap.py")
VAL_FILES = ("shlex.py", "fractions.py")
TEST_FILES = ("configparser.py",)


def stdlib_bytes(files: Sequence[str]) -> torch.Tensor:
    """The bytes of ``files`` (paths relative to the standard library), concatenated, as a long tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((root / name).read_bytes() for name in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class StdlibText(Dataset):
    """Blocks of ``block_size`` bytes and the same blocks shifted by one (the next-byte targets), like Lightning's
    ``WikiText2`` demo returns ``(inputs, target)``.

    Example::

        >>> inputs, target = StdlibText(VAL_FILES, block_size=8)[0]
        >>> inputs.shape, bool((inputs[1:] == target[:-1]).all())
        (torch.Size([8]), True)
    """

    def __init__(self, files: Sequence[str] = TRAIN_FILES, block_size: int = 64, max_bytes: int | None = None) -> None:
        self.data = stdlib_bytes(files)[:max_bytes]
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.block_size
        return self.data[start : start + self.block_size], self.data[start + 1 : start + self.block_size + 1]


class StdlibTextDataModule(L.LightningDataModule):
    """Train, validation and test :class:`StdlibText` (at most ``max_bytes`` of each), batches of
    ``(inputs, target)``."""

    def __init__(self, block_size: int = 64, batch_size: int = 16, max_bytes: int | None = None) -> None:
        super().__init__()
        self.block_size, self.batch_size, self.max_bytes = block_size, batch_size, max_bytes

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            StdlibText(TRAIN_FILES, self.block_size, self.max_bytes),
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(StdlibText(VAL_FILES, self.block_size, self.max_bytes), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(StdlibText(TEST_FILES, self.block_size, self.max_bytes), batch_size=self.batch_size)
