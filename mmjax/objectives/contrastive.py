"""Contrastive image-text objectives: CLIP's softmax InfoNCE and SigLIP's sigmoid loss.

Each loss has a plain form (the reference: global [B, B] logits on one device) and a sharded
form that runs under the context mesh (`jax.set_mesh`) with `jax.shard_map` over the batch
axes, so no device ever holds the global logit matrix:

- `clip_loss_sharded`: every device all-gathers the other tower's embeddings (gradients flow
  back through the gather) and computes its local rows against all columns, [B_local, B].
- `siglip_loss_sharded`: the chunked form of SigLIP (Zhai et al., 2023, Sec. 3.3): text
  chunks travel around the ring of devices with `ppermute`, each step scoring a
  [B_local, B_local] block. A custom VJP runs the ring again in the backward pass, so
  per-device memory stays O(B_local^2 + B_local * D) however large the global batch is.

Both equal their reference in loss, gradients and metrics; without a mesh holding any batch
axis in context they fall back to the reference.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from mmjax.parallel.sharding import BATCH_AXES

Metrics = dict[str, jax.Array]


def clip_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Symmetric softmax InfoNCE over the batch (CLIP, Radford et al., 2021, Fig. 3).

    Embeddings are unit-norm [B, D]; pair i is the positive of row i and column i.
    """
    logits = logit_scale * jnp.einsum(
        "id,jd->ij", image_emb, text_emb, preferred_element_type=jnp.float32
    )
    labels = jnp.arange(logits.shape[0])
    i2t = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], 1))
    t2i = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], 0))
    loss = 0.5 * (i2t + t2i)
    metrics = {
        "loss": loss,
        "logit_scale": logit_scale,
        "i2t_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels),
        "t2i_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == labels),
    }
    return loss, metrics


def siglip_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Pairwise sigmoid loss (SigLIP, Zhai et al., 2023, Eq. 1 and Algorithm 1).

    -1/|B| * sum_ij log sigmoid(z_ij * (t * x_i . y_j + b)), z_ij = 1 if i == j else -1,
    with t = `logit_scale` (= exp(t')) and b = `logit_bias`. Embeddings are unit-norm [B, D].
    """
    logits = logit_bias + logit_scale * jnp.einsum(
        "id,jd->ij", image_emb, text_emb, preferred_element_type=jnp.float32
    )
    n = logits.shape[0]
    z = 2.0 * jnp.eye(n, dtype=logits.dtype) - 1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(z * logits)) / n
    labels = jnp.arange(n)
    metrics = {
        "loss": loss,
        "logit_scale": logit_scale,
        "logit_bias": logit_bias,
        "i2t_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels),
        "t2i_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == labels),
    }
    return loss, metrics


def _context_batch_axes(axis_names: Sequence[str]) -> tuple[AbstractMesh, tuple[str, ...]]:
    """The context mesh and those of `axis_names` it has (in mesh order: major to minor)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return mesh, ()
    return mesh, tuple(a for a in mesh.axis_names if a in axis_names)


def _check_divisible(batch: int, mesh: AbstractMesh, axes: tuple[str, ...]) -> None:
    shards = 1
    for a in axes:
        shards *= mesh.shape[a]
    if batch % shards:
        raise ValueError(
            f"contrastive loss: batch {batch} is not divisible by the {shards} shards of "
            f"mesh axes {axes}"
        )


def _softmax_xent_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Sum over rows of -log softmax(logits)[row, label]."""
    picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=1) - picked)


def _clip_local(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, axes: tuple[str, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-device body of `clip_loss_sharded`: local rows x gathered columns, both ways."""
    b = image_emb.shape[0]
    all_img = jax.lax.all_gather(image_emb, axes, tiled=True)
    all_txt = jax.lax.all_gather(text_emb, axes, tiled=True)
    n = all_img.shape[0]
    labels = jax.lax.axis_index(axes) * b + jnp.arange(b)
    i2t = logit_scale * jnp.einsum(
        "id,jd->ij", image_emb, all_txt, preferred_element_type=jnp.float32
    )
    t2i = logit_scale * jnp.einsum(
        "jd,id->ji", text_emb, all_img, preferred_element_type=jnp.float32
    )
    total = jax.lax.psum(_softmax_xent_sum(i2t, labels) + _softmax_xent_sum(t2i, labels), axes)
    loss = 0.5 * total / n
    i2t_acc = jax.lax.psum(jnp.sum(jnp.argmax(i2t, axis=1) == labels), axes) / n
    t2i_acc = jax.lax.psum(jnp.sum(jnp.argmax(t2i, axis=1) == labels), axes) / n
    return loss, i2t_acc, t2i_acc


def clip_loss_sharded(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    *,
    axis_names: Sequence[str] = BATCH_AXES,
) -> tuple[jax.Array, Metrics]:
    """`clip_loss` sharded over the context mesh's batch axes (open_clip's `local_loss`).

    Each device all-gathers both towers' embeddings with their gradients and scores its
    B_local rows against all B columns in both directions (CLIP, Radford et al., 2021,
    Fig. 3); the loss is the mean over the global batch. Equal to `clip_loss`.
    """
    mesh, axes = _context_batch_axes(axis_names)
    if not axes:
        return clip_loss(image_emb, text_emb, logit_scale)
    _check_divisible(image_emb.shape[0], mesh, axes)
    spec = P(axes)
    loss, i2t_acc, t2i_acc = jax.shard_map(
        functools.partial(_clip_local, axes=axes),
        mesh=mesh,
        in_specs=(spec, spec, P()),
        out_specs=(P(), P(), P()),
    )(image_emb, text_emb, logit_scale)
    metrics = {
        "loss": loss,
        "logit_scale": logit_scale,
        "i2t_accuracy": i2t_acc,
        "t2i_accuracy": t2i_acc,
    }
    return loss, metrics


def _first_max(
    value: jax.Array, index: jax.Array, new_value: jax.Array, new_index: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Running (max, argmax) with ties to the smaller index, as `jnp.argmax` breaks them."""
    take = (new_value > value) | ((new_value == value) & (new_index < index))
    return jnp.where(take, new_value, value), jnp.where(take, new_index, index)


def _siglip_ring(axes: tuple[str, ...], n_dev: int) -> Callable[..., tuple[jax.Array, ...]]:
    """The chunked sigmoid loss of one device (Zhai et al., 2023, Sec. 3.3), as a custom VJP.

    `ring(img, txt, t, b)` takes local [b, D] chunks and a varying t and b, and returns the
    device's sum of -log sigmoid(z * logits) over its rows against all texts, plus the counts
    of its rows (images) and of the text columns it scored that are ranked first.
    """
    perm = [(i, (i + 1) % n_dev) for i in range(n_dev)]  # device k receives from k - 1

    def shift(x: jax.Array) -> jax.Array:
        return jax.lax.ppermute(x, axes, perm)

    def block(img, chunk, scale, bias, step):
        """Logits, labels z and global column offset of the chunk held at `step`."""
        me = jax.lax.axis_index(axes)
        src = (me - step) % n_dev  # the device this text chunk belongs to
        x = jnp.einsum("id,jd->ij", img, chunk, preferred_element_type=jnp.float32)
        logits = scale * x + bias
        n = img.shape[0]
        z = jnp.where((src == me) & jnp.eye(n, dtype=bool), 1.0, -1.0).astype(logits.dtype)
        return x, logits, z, src * n

    def varying(x: jax.Array) -> jax.Array:
        return jax.lax.pcast(x, axes, to="varying")

    def forward(img, txt, scale, bias):
        n = img.shape[0]
        me = jax.lax.axis_index(axes)
        local = jnp.arange(n)

        def score(carry, chunk, col_best, step):
            loss, row_best = carry
            _, logits, z, offset = block(img, chunk, scale, bias, step)
            loss = loss - jnp.sum(jax.nn.log_sigmoid(z * logits))
            row_best = _first_max(*row_best, jnp.max(logits, 1), offset + jnp.argmax(logits, 1))
            col_best = _first_max(*col_best, jnp.max(logits, 0), me * n + jnp.argmax(logits, 0))
            return (loss, row_best), col_best

        def body(step, state):
            carry, chunk, col_best = state
            # The text send does not depend on this step's compute, so the two can overlap;
            # each text column carries its running best image along with it.
            next_chunk = shift(chunk)
            carry, col_best = score(carry, chunk, col_best, step)
            return carry, next_chunk, shift(col_best)

        none = (
            varying(jnp.full((n,), -jnp.inf, jnp.float32)),
            varying(jnp.full((n,), jnp.iinfo(jnp.int32).max, jnp.int32)),
        )
        carry = (varying(jnp.zeros((), jnp.float32)), none)
        carry, chunk, col_best = jax.lax.fori_loop(0, n_dev - 1, body, (carry, txt, none))
        (loss, (_, row_arg)), (_, col_arg) = score(carry, chunk, col_best, n_dev - 1)
        # The chunk held last has now met every image: its text j is ranked right when its
        # best image is image j. Its owner is the next device.
        col_offset = ((me + 1) % n_dev) * n
        row_hits = jnp.sum(row_arg == me * n + local)
        col_hits = jnp.sum(col_arg == col_offset + local)
        return loss, row_hits.astype(jnp.float32), col_hits.astype(jnp.float32)

    @jax.custom_vjp
    def ring(img, txt, scale, bias):
        return forward(img, txt, scale, bias)

    def ring_fwd(img, txt, scale, bias):
        return forward(img, txt, scale, bias), (img, txt, scale, bias)

    def ring_bwd(res, cotangents):
        img, txt, scale, bias = res
        g = cotangents[0]

        def grads(acc, chunk, chunk_acc, step):
            d_img, d_scale, d_bias = acc
            x, logits, z, _ = block(img, chunk, scale, bias, step)
            # d/dl [-log sigmoid(z l)] = -z sigmoid(-z l)
            dl = g * (-z * jax.nn.sigmoid(-z * logits))
            d_img = d_img + scale * jnp.einsum("ij,jd->id", dl, chunk.astype(jnp.float32))
            chunk_acc = chunk_acc + scale * jnp.einsum("ij,id->jd", dl, img.astype(jnp.float32))
            return (d_img, d_scale + jnp.sum(dl * x), d_bias + jnp.sum(dl)), chunk_acc

        def body(step, state):
            acc, chunk, chunk_acc = state
            next_chunk = shift(chunk)
            acc, chunk_acc = grads(acc, chunk, chunk_acc, step)
            return acc, next_chunk, shift(chunk_acc)

        zero = varying(jnp.zeros((), jnp.float32))
        acc = (varying(jnp.zeros(img.shape, jnp.float32)), zero, zero)
        chunk_acc = varying(jnp.zeros(txt.shape, jnp.float32))
        acc, chunk, chunk_acc = jax.lax.fori_loop(0, n_dev - 1, body, (acc, txt, chunk_acc))
        (d_img, d_scale, d_bias), chunk_acc = grads(acc, chunk, chunk_acc, n_dev - 1)
        # The accumulated gradient of the chunk held last belongs to the next device.
        d_txt = shift(chunk_acc) if n_dev > 1 else chunk_acc
        return d_img.astype(img.dtype), d_txt.astype(txt.dtype), d_scale, d_bias

    ring.defvjp(ring_fwd, ring_bwd)
    return ring


def _siglip_local(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    axes: tuple[str, ...],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-device body of `siglip_loss_sharded`."""
    n_dev = jax.lax.axis_size(axes)
    # t and b enter the ring as per-device values: their cotangents from each device's blocks
    # are then summed over devices by the transpose of this cast.
    scale = jax.lax.pcast(logit_scale.astype(jnp.float32), axes, to="varying")
    bias = jax.lax.pcast(logit_bias.astype(jnp.float32), axes, to="varying")
    loss_sum, row_hits, col_hits = _siglip_ring(axes, n_dev)(image_emb, text_emb, scale, bias)
    n = image_emb.shape[0] * n_dev
    loss = jax.lax.psum(loss_sum, axes) / n
    return loss, jax.lax.psum(row_hits, axes) / n, jax.lax.psum(col_hits, axes) / n


def siglip_loss_sharded(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    *,
    axis_names: Sequence[str] = BATCH_AXES,
) -> tuple[jax.Array, Metrics]:
    """`siglip_loss` in the chunked form of Zhai et al., 2023, Sec. 3.3, over the batch axes.

    Each device scores its images against its own texts, then against every other device's
    texts as they are passed around the ring with `ppermute` (D - 1 steps), holding one
    [B_local, B_local] block at a time; the backward pass runs the ring again. Equal to
    `siglip_loss` (loss, gradients, metrics).
    """
    mesh, axes = _context_batch_axes(axis_names)
    if not axes:
        return siglip_loss(image_emb, text_emb, logit_scale, logit_bias)
    _check_divisible(image_emb.shape[0], mesh, axes)
    spec = P(axes)
    loss, i2t_acc, t2i_acc = jax.shard_map(
        functools.partial(_siglip_local, axes=axes),
        mesh=mesh,
        in_specs=(spec, spec, P(), P()),
        out_specs=(P(), P(), P()),
    )(image_emb, text_emb, logit_scale, logit_bias)
    metrics = {
        "loss": loss,
        "logit_scale": logit_scale,
        "logit_bias": logit_bias,
        "i2t_accuracy": i2t_acc,
        "t2i_accuracy": t2i_acc,
    }
    return loss, metrics
