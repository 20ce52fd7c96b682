"""The generic trainer: `train_and_evaluate(config, workdir)` and the `python -m mmjax.train` CLI."""

from mmjax.train.loop import train_and_evaluate

__all__ = ["train_and_evaluate"]
