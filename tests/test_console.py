"""What a user's console shows: dependency noise dropped where it is noise, errors short with the rest in a log."""

import subprocess
import sys

IMPORT_TRANSFORMERS_THEN_TORCHAO = """
import lightning_quant
import transformers
from transformers import BertForSequenceClassification  # imports torchao before lightning_quant does
import logging, torchao
logging.getLogger("torchao").warning("a real torchao warning")
"""


def test_torchaos_cpu_import_noise_is_dropped_whoever_imports_it_and_its_real_warnings_are_not():
    done = subprocess.run([sys.executable, "-c", IMPORT_TRANSFORMERS_THEN_TORCHAO], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Failed to load" not in done.stderr and "is an Enum subclass" not in done.stderr, done.stderr
    assert "a real torchao warning" in done.stderr


def test_onnx_runtime_and_torch_export_noise_is_dropped_and_the_same_loggers_still_speak(caplog):
    import logging

    import lightning_quant  # noqa: F401  (installs the filters)

    logging.warning("Axis 1 is out-of-range for weight 'encoder.norm.weight' with rank 1")  # ORT, per LayerNorm
    serde = logging.getLogger("torch._export.serde.serialize")
    serde.warning("Symbol u1 did not appear in the graph that was deserialized")
    logging.warning("a real warning at the root logger")
    serde.warning("a real torch.export warning")
    assert [record.getMessage() for record in caplog.records] == [
        "a real warning at the root logger",
        "a real torch.export warning",
    ]
