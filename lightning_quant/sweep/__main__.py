"""``python -m lightning_quant.sweep SWEEP_DIR [METRIC]``: rebuild the comparison of a sweep folder."""

from lightning_quant.sweep import main

main()
