"""Train a model on digits with lightning-quant callbacks: `python train.py [overrides]`.

Examples:
    python train.py                                  # conv net on digits, the default callbacks
    python train.py model=lstm trainer.max_epochs=5
    python train.py -m model=convnet,mlp             # a sweep, one folder per job
"""

import hydra
from omegaconf import DictConfig

import lightning_quant.configs  # noqa: F401  (registers the structured configs)
from lightning_quant.app import log_through_root, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    log_through_root()  # into Hydra's train.log too
    return train(cfg)


if __name__ == "__main__":
    main()
