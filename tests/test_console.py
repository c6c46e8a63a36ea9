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
