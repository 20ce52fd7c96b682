"""The one generic training loop: config in, trained and evaluated workdir out."""

import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from mmjax import data as mmdata
from mmjax import evals, models, objectives, parallel
from mmjax.errors import UserError
from mmjax.train.checkpoint import Checkpointer, abstract_like
from mmjax.train.metrics import MetricWriter
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import TrainState

log = logging.getLogger("mmjax.train")


def prepare_workdir(workdir: str) -> str:
    """Creates `workdir` and checks it is writable; returns its absolute path."""
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from None
    return workdir


def fill_vocab_size(model_cfg: ml_collections.ConfigDict, vocab_size: int) -> None:
    """Sets every `vocab_size: 0` in the model config to the tokenizer's size rounded up to 128."""
    padded = -(-vocab_size // 128) * 128
    for key, value in model_cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            fill_vocab_size(value, vocab_size)
        elif key == "vocab_size" and value == 0:
            model_cfg[key] = padded


def make_train_step(loss_fn, tx: optax.GradientTransformation, schedule, seed: int):
    """One optimizer step; the step's rng is fold_in(seed, step), so reruns are reproducible."""
    base_rng = jax.random.key(seed)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        rng = jax.random.fold_in(base_rng, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **metrics,
            "learning_rate": schedule(state.step),
            "grad_norm": optax.tree.norm(grads),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


class Trainer:
    """Builds model, loss, optimizer, mesh, data and evaluators from a config."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | None,
        devices: list[jax.Device] | None = None,
    ):
        self.config = config
        self.is_main = jax.process_index() == 0
        self.rules = parallel.validate_rules(config.mesh.rules)
        sizes = {k: v for k, v in config.mesh.items() if k != "rules"}
        try:
            self.mesh = parallel.make_mesh(sizes, devices)
        except ValueError as e:
            raise UserError(f"mesh: {e}") from None
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if config.batch_size % shards:
            raise UserError(
                f"batch_size {config.batch_size} is not divisible by data x fsdp = {shards}"
            )
        self.tokenizer = mmdata.load_or_train_tokenizer(
            config.data, workdir, write=self.is_main and workdir is not None
        )
        fill_vocab_size(config.model, self.tokenizer.vocab_size)
        self.model = models.build_model(config.model)
        self.loss_fn = objectives.build_loss(
            config.objective.name, self.apply_fn, **config.objective.get("kwargs", {})
        )
        self.tx, self.schedule = make_optimizer(config.optimizer, config.total_steps)

    def apply_fn(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array) -> Any:
        return self.model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})

    def data_iterator(self):
        return mmdata.make_train_iterator(
            self.config.data,
            self.tokenizer,
            global_batch_size=self.config.batch_size,
            seed=self.config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def init_state(self, example_batch: Mapping[str, np.ndarray]) -> tuple[TrainState, Any]:
        """Initialises the train state directly with its logical shardings."""
        example = {k: jnp.asarray(v[:1]) for k, v in example_batch.items()}

        def init_fn(rng):
            params = self.model.init(rng, example)["params"]
            return TrainState.create(params, self.tx)

        with jax.set_mesh(self.mesh):
            return parallel.init_sharded(
                init_fn, jax.random.key(self.config.seed), self.mesh, self.rules
            )

    def jit_train_step(self, state_shardings: Any):
        step = make_train_step(self.loss_fn, self.tx, self.schedule, self.config.seed)
        return jax.jit(
            step,
            in_shardings=(state_shardings, parallel.batch_sharding(self.mesh)),
            out_shardings=(state_shardings, None),
            donate_argnums=0,
        )


class _Preemption:
    """Turns SIGTERM into a flag the loop checks, so it can checkpoint and exit 0."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns final metrics."""
    parallel.maybe_initialize(config.get("distributed", False))
    workdir = prepare_workdir(workdir)
    trainer = Trainer(config, workdir)
    if trainer.is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    data_iter = trainer.data_iterator()
    example = next(trainer.data_iterator())
    state, shardings = trainer.init_state(example)
    ckpt = Checkpointer(workdir, keep=config.get("keep_checkpoints", 3))
    writer = MetricWriter(workdir, active=trainer.is_main)
    preemption = _Preemption()
    try:
        start = ckpt.latest_step()
        if start is not None:
            state = ckpt.restore(start, abstract_like(state, shardings), data_iter)
            print(f"Resuming from step {start} (checkpoint in {ckpt.directory})", flush=True)
        with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
            evaluators = evals.build_evaluators(
                config.evals, trainer.model, trainer.tokenizer, config.data, trainer.mesh
            )
            final = _run(
                config,
                trainer,
                state,
                shardings,
                data_iter,
                ckpt,
                writer,
                evaluators,
                preemption,
                start or 0,
            )
    finally:
        preemption.restore()
        ckpt.close()
        writer.close()
    return final


def _run(
    config, trainer, state, shardings, data_iter, ckpt, writer, evaluators, preemption, start: int
) -> dict[str, float]:
    train_step = trainer.jit_train_step(shardings)
    total = config.total_steps
    final: dict[str, float] = {}

    def evaluate(step: int) -> None:
        for name, evaluator in evaluators.items():
            t0 = time.perf_counter()
            results = evaluator(state.params)
            log.info(
                "eval %s at step %d took %.1fs: %s", name, step, time.perf_counter() - t0, results
            )
            writer.write(step, results)
            final.update(results)

    bar = tqdm(
        total=total,
        initial=start,
        desc="train",
        disable=not trainer.is_main,
        dynamic_ncols=True,
        unit="step",
    )
    pending: list[dict] = []
    t_log, examples = time.perf_counter(), 0
    step = start
    for step in range(start + 1, total + 1):
        batch = parallel.global_batch(next(data_iter), trainer.mesh)
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        examples += config.batch_size
        bar.update(1)
        if step % config.log_every == 0 or step == total:
            means = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
            elapsed = time.perf_counter() - t_log
            means["examples_per_sec"] = examples / elapsed
            writer.write(step, means)
            final.update(means)
            bar.set_postfix(loss=f"{means['loss']:.4f}", ex_s=f"{means['examples_per_sec']:.0f}")
            pending, t_log, examples = [], time.perf_counter(), 0
        if step % config.eval_every == 0 and step != total:
            evaluate(step)
        if preemption.requested or ckpt.reached_preemption(step):
            ckpt.save(step, state, data_iter, force=True)
            bar.close()
            print(f"Preempted: saved checkpoint at step {step}; rerun to resume.", flush=True)
            return final
        if step % config.checkpoint_every == 0 or step == total:
            ckpt.save(step, state, data_iter, force=step == total)
    bar.close()
    evaluate(total)
    if start >= total:
        print(f"Training already finished at step {start}.", flush=True)
    if trainer.is_main:
        summary = {k: round(v, 4) for k, v in final.items()}
        print(json.dumps({"step": step, **summary}), flush=True)
    return final
