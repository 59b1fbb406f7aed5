"""Training: one accelerate loop (:mod:`genvl.training.trainer`), one Task per stage."""

from genvl.training.config import DataConfig, TrainConfig
from genvl.training.trainer import Task, TrainResult, train

__all__ = ["DataConfig", "TrainConfig", "Task", "TrainResult", "train"]
