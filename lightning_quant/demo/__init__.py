"""The data and models the default app trains: real handwritten digits, small nets, no downloads."""

from lightning_quant.demo.data import DigitsDataModule
from lightning_quant.demo.module import DigitsClassifier
from lightning_quant.demo.nets import ConvNet, LSTMNet, MLPNet, ResNet, TransformerNet

__all__ = ["DigitsDataModule", "DigitsClassifier", "ConvNet", "LSTMNet", "MLPNet", "ResNet", "TransformerNet"]
