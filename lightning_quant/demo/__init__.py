"""The data and models the demo runs train: real handwritten digits and the standard library's own source
text, small nets, no downloads."""

from lightning_quant.demo.data import DigitsDataModule
from lightning_quant.demo.language_model import ByteLanguageModel
from lightning_quant.demo.module import DigitsClassifier
from lightning_quant.demo.nets import ConvNet, LSTMNet, MLPNet, ResNet, TransformerNet
from lightning_quant.demo.text import StdlibTextDataModule

__all__ = [
    "DigitsDataModule",
    "DigitsClassifier",
    "ConvNet",
    "LSTMNet",
    "MLPNet",
    "ResNet",
    "TransformerNet",
    "ByteLanguageModel",
    "StdlibTextDataModule",
]
