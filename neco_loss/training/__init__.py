"""NeCo post-pretraining: configuration, the training loop, checkpoints."""

from neco_loss.training.config import TrainConfig, build_config, load_config
from neco_loss.training.distributed import train
from neco_loss.training.run_folder import TrainResult
from neco_loss.training.trainer import Trainer

__all__ = ["TrainConfig", "TrainResult", "Trainer", "build_config", "load_config", "train"]
