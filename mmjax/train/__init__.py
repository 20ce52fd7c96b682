"""The generic trainer: `train_and_evaluate(config, workdir)`; CLI `python -m mmjax.train`."""

from mmjax.train.loop import train_and_evaluate

__all__ = ["train_and_evaluate"]
