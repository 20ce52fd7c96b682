"""The one generic training loop: config in, trained and evaluated workdir out."""

import functools
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
from mmjax import families, objectives, parallel
from mmjax.errors import TrainingError, UserError
from mmjax.train.build import build
from mmjax.train.checkpoint import Checkpointer, abstract_like
from mmjax.train.metrics import MetricWriter
from mmjax.train.optimizer import make_optimizer
from mmjax.train.stages import stop_frozen_gradients
from mmjax.train.state import TrainState
from mmjax.train.workdir import check_load, initial_params, load_from_workdir

log = logging.getLogger("mmjax.train")

DEFAULT_MAX_BAD_STEPS = 5
COUNTERS = ("skipped_steps", "bad_steps")  # logged as their latest value, not averaged


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


def make_train_step(loss_fn, tx: optax.GradientTransformation, schedule, seed: int):
    """One optimizer step; the step's rng is fold_in(seed, step), so reruns are reproducible.

    The key is made inside the step: building it eagerly would run an op on the default
    device, which a compile-only TPU topology (`python -m mmjax.aot`) cannot execute."""

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(state.params, batch, rng)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # NaN/Inf policy: a non-finite loss or gradient skips the update and is counted.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
        skipped = state.skipped_steps + (~ok).astype(jnp.int32)
        metrics = {
            **metrics,
            "learning_rate": schedule(state.step),
            "grad_norm": grad_norm,
            "skipped_steps": skipped,
            "bad_steps": jnp.where(ok, 0, state.bad_steps + 1),
        }
        return state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            bad_steps=metrics["bad_steps"],
            skipped_steps=skipped,
        ), metrics

    return train_step


class Trainer:
    """A config's bundle (train/build.py) + optimizer + loss + data: what the loop steps."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | None,
        devices: list[jax.Device] | None = None,
        tokenizer: mmdata.Tokenizer | None = None,
        precomputed_latents: bool = False,
    ):
        """`config` is left unchanged; `self.config` is the resolved one. `tokenizer` and
        `precomputed_latents` as in `build`."""
        self.bundle = build(
            config,
            workdir,
            devices=devices,
            tokenizer=tokenizer,
            precomputed_latents=precomputed_latents,
        )
        bundle = self.bundle
        self.config, self.model, self.tokenizer = bundle.config, bundle.model, bundle.tokenizer
        self.mesh, self.rules, self.latents = bundle.mesh, bundle.rules, bundle.latents
        self.is_main = jax.process_index() == 0
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if self.config.batch_size % shards:
            raise UserError(
                f"batch_size {self.config.batch_size} is not divisible by data x fsdp = {shards}"
            )
        self.loss_fn = objectives.build_loss(
            self.config.objective.name, self.apply_fn, **self.config.objective.get("kwargs", {})
        )
        if self.latents is not None:
            self.loss_fn = objectives.on_latents(self.loss_fn, self.latents)
        frozen = tuple(self.config.optimizer.get("frozen", ()))
        if frozen:
            self.loss_fn = stop_frozen_gradients(self.loss_fn, frozen)
        self.tx, self.schedule = make_optimizer(self.config.optimizer, self.config.total_steps)

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

    def _init_fn(self, seed: int, example: Mapping[str, Any]) -> TrainState:
        """The initial train state from one example of the batch (batch dimension 1), its
        leaves boxed with their logical axes. Traced only (the key is made inside), so the
        abstract state needs no device at all."""
        return TrainState.create(self.bundle.init_params(seed, example), self.tx)

    def init_state(self, example_batch: Mapping[str, np.ndarray]) -> tuple[TrainState, Any]:
        """Initialises the train state directly with its logical shardings."""
        example = {k: np.asarray(v[:1]) for k, v in example_batch.items()}
        with jax.set_mesh(self.mesh):
            try:
                return parallel.init_sharded(
                    self._init_fn, self.mesh, self.rules, self.config.seed, example
                )
            except parallel.UnevenShardingError as e:
                raise UserError(f"mesh: {e}") from None

    def abstract_state(self, example_batch: Mapping[str, Any]) -> Any:
        """The train state's shapes, dtypes and shardings, not computed: a restore target,
        or the input of an ahead-of-time compile. `example_batch` holds arrays or
        `jax.ShapeDtypeStruct`s."""
        return self.bundle.abstract(self._init_fn, example_batch)

    def jit_train_step(self, state_shardings: Any):
        step = make_train_step(self.loss_fn, self.tx, self.schedule, self.config.seed)
        return jax.jit(
            step,
            in_shardings=(state_shardings, parallel.batch_sharding(self.mesh)),
            out_shardings=(state_shardings, None),
            donate_argnums=0,
        )


class _Preemption:
    """Turns SIGTERM into a flag the loop checks, so it can checkpoint and exit 0.

    With several processes JAX's own preemption notifier handles SIGTERM, and Orbax's
    `reached_preemption` makes every process save at the same step; then this stays out.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns final metrics."""
    parallel.maybe_initialize(config.get("distributed", False))
    workdir = prepare_workdir(workdir)
    trainer = Trainer(config, workdir)
    with TrainingRun(trainer, workdir) as run:
        return run.train()


class TrainingRun:
    """One invocation of training in a workdir: restore, loop, evaluate, checkpoint, close."""

    def __init__(self, trainer: Trainer, workdir: str):
        self.trainer, self.config = trainer, trainer.config
        self.data_iter = trainer.data_iterator()
        self.example_batch = next(trainer.data_iterator())
        families.check_batch(trainer.bundle.family, self.example_batch)
        self.ckpt = Checkpointer(workdir, keep=self.config.get("keep_checkpoints", 3))
        try:
            if trainer.bundle.from_workdir and self.ckpt.latest_step() is None:  # pre-compile
                check_load(
                    self.config.init_from,
                    trainer.bundle.boxed_params(self.example_batch),
                    trainer.tokenizer,
                    self.config.data,
                )
            self.state, self.shardings = trainer.init_state(self.example_batch)
        except BaseException:
            self.ckpt.close()
            raise
        self.writer = MetricWriter(workdir, active=trainer.is_main)
        self.preemption = _Preemption()
        self.workdir = workdir
        self.final: dict[str, float] = {}
        self.start = 0

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, *exc) -> None:
        self.preemption.restore()
        self.ckpt.close()  # waits for pending async saves, also when training failed
        self.writer.close()

    def train(self) -> dict[str, float]:
        """Runs the loop from the latest checkpoint to `total_steps`; returns final metrics."""
        trainer = self.trainer
        restored = self.ckpt.restore_latest(
            abstract_like(self.state, self.shardings), self.data_iter
        )
        start = initial_params(self.config.init_from, restored[0] if restored else None)
        if start.source == "resume":
            self.start, self.state = restored
            print(
                f"Resuming from step {self.start} (checkpoint in {self.ckpt.directory})", flush=True
            )
        elif start.source in ("import", "workdir"):
            bundle, params, shardings = trainer.bundle, self.state.params, self.shardings.params
            if start.source == "import":
                params = bundle.imported_params(self.example_batch, params, shardings)
            if bundle.from_workdir:  # the first source, or workdirs among init_from.more
                params = load_from_workdir(self.config.init_from, params, shardings)
            params = bundle.imported_subtrees(params, shardings)
            self.state = self.state.replace(params=params)
        log.info("initial parameters: %s", start.reason)
        if start.source != "resume":
            print(f"Initial parameters: {start.reason}", flush=True)
        if trainer.is_main:  # only once the workdir's checkpoints are known to fit this config
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(self.config.to_json_best_effort(indent=2, sort_keys=True))
        with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
            self.evaluators = trainer.bundle.evaluators(self.workdir)
            if self.start >= self.config.total_steps:
                print(f"Training already finished at step {self.start}.")
            elif not self._loop(trainer.jit_train_step(self.shardings)):
                return self.final  # preempted
            self.evaluate(self.config.total_steps)
        if trainer.is_main:
            summary = {k: round(v, 4) for k, v in self.final.items()}
            print(json.dumps({"step": self.config.total_steps, **summary}), flush=True)
        return self.final

    def _loop(self, train_step) -> bool:
        """Steps to `total_steps` with logging, evals and checkpoints; False if preempted."""
        config, total = self.config, self.config.total_steps
        bar = tqdm(
            total=total,
            initial=self.start,
            desc="train",
            disable=not self.trainer.is_main,
            dynamic_ncols=True,
            unit="step",
        )
        pending: list[dict] = []
        t_log = time.perf_counter()
        for step in range(self.start + 1, total + 1):
            batch = parallel.global_batch(next(self.data_iter), self.trainer.mesh)
            self.state, metrics = train_step(self.state, batch)
            if pending:  # the previous step has (nearly) finished: checking it costs no stall
                self._check_finite(step - 1, int(pending[-1]["bad_steps"]))
            pending.append(metrics)
            bar.update(1)
            if step % config.log_every == 0 or step == total:
                self._check_finite(step, int(metrics["bad_steps"]))
                means = {
                    k: float(np.mean(jax.device_get([m[k] for m in pending])))
                    for k in metrics
                    if k not in COUNTERS
                }
                means.update({k: int(metrics[k]) for k in COUNTERS})
                means["examples_per_sec"] = (
                    len(pending) * config.batch_size / (time.perf_counter() - t_log)
                )
                self.writer.write(step, means)
                self.final.update(means)
                bar.set_postfix(
                    loss=f"{means['loss']:.4f}", ex_s=f"{means['examples_per_sec']:.0f}"
                )
                pending, t_log = [], time.perf_counter()
            if step % config.eval_every == 0 and step != total:
                self.evaluate(step)
            if self.preemption.requested or self.ckpt.reached_preemption(step):
                self.ckpt.save(step, self.state, self.data_iter, force=True)
                bar.close()
                print(f"Preempted: saved checkpoint at step {step}; rerun to resume.", flush=True)
                return False
            if step % config.checkpoint_every == 0 or step == total:
                if int(metrics["bad_steps"]):  # keep the last good checkpoint in keep-N
                    log.warning("step %d: not checkpointing during non-finite steps", step)
                else:
                    self.ckpt.save(step, self.state, self.data_iter, force=step == total)
        bar.close()
        return True

    def _check_finite(self, step: int, bad_steps: int) -> None:
        """Logs a skipped update; stops after more than `max_bad_steps` in a row."""
        if not bad_steps:
            return
        limit = self.config.get("max_bad_steps", DEFAULT_MAX_BAD_STEPS)
        if bad_steps > limit:
            raise TrainingError(
                f"loss or gradients were NaN/Inf for {bad_steps} consecutive steps "
                f"({step - bad_steps + 1}..{step}), more than max_bad_steps={limit}; stopping. "
                f"The last good checkpoint is step {self.ckpt.latest_step()} in "
                f"{self.ckpt.directory}."
            )
        log.warning(
            "step %d: loss or gradients NaN/Inf, update skipped (%d in a row)", step, bad_steps
        )

    def evaluate(self, step: int) -> None:
        """Runs every evaluator on the current parameters; writes one record at `step`."""
        record: dict[str, float] = {}
        for name, evaluator in self.evaluators.items():
            t0 = time.perf_counter()
            results = evaluator(self.state.params)
            log.info(
                "eval %s at step %d (%.1fs): %s", name, step, time.perf_counter() - t0, results
            )
            record.update(results)
        if record:
            self.writer.write(step, record)
            self.final.update(record)
