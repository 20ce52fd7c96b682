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

from mmjax import convert, evals, models, objectives, parallel
from mmjax import data as mmdata
from mmjax.errors import TrainingError, UserError
from mmjax.train.checkpoint import Checkpointer, abstract_like
from mmjax.train.latents import load_latent_space
from mmjax.train.metrics import MetricWriter
from mmjax.train.optimizer import make_optimizer
from mmjax.train.stages import (
    WORKDIR_FORMAT,
    check_load,
    check_workdir_source,
    load_from_workdir,
    stop_frozen_gradients,
)
from mmjax.train.state import TrainState

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


def fill_vocab_size(model_cfg: ml_collections.ConfigDict, vocab_size: int) -> None:
    """Sets every `vocab_size: 0` in the model config to the tokenizer's size rounded up to 128."""
    padded = -(-vocab_size // 128) * 128
    for key, value in model_cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            fill_vocab_size(value, vocab_size)
        elif key == "vocab_size" and value == 0:
            model_cfg[key] = padded


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
    """Builds model, loss, optimizer, mesh, data and evaluators from a config."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | None,
        devices: list[jax.Device] | None = None,
        tokenizer: mmdata.Tokenizer | None = None,
        precomputed_latents: bool = False,
    ):
        """`tokenizer` replaces the config's own (loaded or trained from the data), and
        `precomputed_latents` says the batches hold a latent-diffusion model's latents
        already (no VAE loaded): how `mmjax.aot` compiles a config without its data."""
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
        self.tokenizer = tokenizer or mmdata.load_or_train_tokenizer(
            config.data, workdir, write=self.is_main and workdir is not None
        )
        fill_vocab_size(config.model, self.tokenizer.vocab_size)
        # config.init_from: converted weights that replace the model (mmjax.convert), or
        # subtrees of an earlier run's params copied in after init (train/stages.py)
        init_from = config.get("init_from", {})
        self.from_workdir = init_from.get("format") == WORKDIR_FORMAT
        if self.from_workdir:
            check_workdir_source(init_from)
        elif init_from.get("more"):
            raise UserError(
                "init_from.more (more earlier workdirs) needs init_from.format=workdir, "
                f"got format {init_from.get('format')!r}"
            )
        self.imported = (
            self._import(config) if init_from.get("format") and not self.from_workdir else None
        )
        self.model = models.build_model(config.model)
        # config.latents: a frozen VAE whose latents the model diffuses (None: pixel space)
        self.latents = None if precomputed_latents else load_latent_space(config, self.mesh)
        self.loss_fn = objectives.build_loss(
            config.objective.name, self.apply_fn, **config.objective.get("kwargs", {})
        )
        if self.latents is not None:
            self.loss_fn = objectives.on_latents(self.loss_fn, self.latents)
        frozen = tuple(config.optimizer.get("frozen", ()))
        if frozen:
            self.loss_fn = stop_frozen_gradients(self.loss_fn, frozen)
        self.tx, self.schedule = make_optimizer(config.optimizer, config.total_steps)

    def _import(self, config: ml_collections.ConfigDict) -> convert.Imported:
        """Imports `config.init_from`; its architecture replaces `config.model`'s."""
        imported = convert.load(config.init_from)
        convert.check_vocab(imported, self.tokenizer.vocab_size, repr(self.tokenizer))
        if config.data.max_text_len > imported.text_len:
            raise UserError(
                f"data.max_text_len {config.data.max_text_len} exceeds the imported text "
                f"context of {imported.text_len} tokens"
            )
        kept = {k: config.model[k] for k in ("dtype", "attention_impl") if k in config.model}
        config.model = ml_collections.ConfigDict({**imported.model, **kept})
        return imported

    def imported_params(self, example_batch: Mapping[str, np.ndarray], shardings: Any) -> Any:
        """The imported parameters placed with `shardings`, once the data is known to fit them."""
        got = tuple(example_batch["image"].shape[1:])
        want = (*self.imported.image_size, self.imported.channels)
        if got != want:
            raise UserError(
                f"the data gives {'x'.join(map(str, got))} images but the imported model was "
                f"trained on {'x'.join(map(str, want))}: set data.image_size"
            )
        return jax.device_put(self.imported.params, shardings)

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
        if self.latents is not None:
            example = objectives.encode_images(example, self.latents, jax.random.key(0))
        params = self.model.init(jax.random.key(seed), example)["params"]
        return TrainState.create(params, self.tx)

    def evaluators(self, workdir: str | None) -> dict:
        """`config.evals` built for this trainer's model, tokenizer, data, mesh and latents
        (call inside the mesh and logical-axis-rules context)."""
        return evals.build_evaluators(
            self.config.evals,
            self.model,
            self.tokenizer,
            self.config.data,
            self.mesh,
            workdir,
            latents=self.latents,
        )

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

    def abstract_state(self, example_batch: Mapping[str, Any], boxed: bool = False) -> Any:
        """The train state's shapes, dtypes and shardings, not computed: a restore target,
        or the input of an ahead-of-time compile. `example_batch` holds arrays or
        `jax.ShapeDtypeStruct`s. `boxed`: the shapes inside their logical-axis boxes instead
        (no shardings)."""
        example = {
            k: jax.ShapeDtypeStruct((1, *v.shape[1:]), v.dtype) for k, v in example_batch.items()
        }
        with jax.set_mesh(self.mesh):
            state = jax.eval_shape(self._init_fn, self.config.seed, example)
        if boxed:
            return state
        try:
            shardings = parallel.logical_shardings(state, self.mesh, self.rules)
        except parallel.UnevenShardingError as e:
            raise UserError(f"mesh: {e}") from None
        return abstract_like(nn.meta.unbox(state), shardings)

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
        self.ckpt = Checkpointer(workdir, keep=self.config.get("keep_checkpoints", 3))
        try:
            if trainer.from_workdir and self.ckpt.latest_step() is None:  # before any compile
                check_load(
                    self.config.init_from,
                    trainer.abstract_state(self.example_batch, boxed=True).params,
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
        if restored:
            self.start, self.state = restored
            print(
                f"Resuming from step {self.start} (checkpoint in {self.ckpt.directory})", flush=True
            )
        elif trainer.imported is not None:
            params = trainer.imported_params(self.example_batch, self.shardings.params)
            self.state = self.state.replace(params=params)
            print(f"Initialised from {dict(self.config.init_from)}", flush=True)
        elif trainer.from_workdir:
            params = load_from_workdir(
                self.config.init_from, self.state.params, self.shardings.params
            )
            self.state = self.state.replace(params=params)
        if trainer.is_main:  # only once the workdir's checkpoints are known to fit this config
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(self.config.to_json_best_effort(indent=2, sort_keys=True))
        with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
            self.evaluators = trainer.evaluators(self.workdir)
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
