"""The one vocabulary of logical axis names, and the default rules mapping it to mesh axes.

Every parameter and constrained activation in mmjax is annotated with names from
`LOGICAL_AXES`; an experiment config's `mesh.rules` maps them to the mesh axes `data`,
`fsdp` and `tensor` (MaxText's `logical_axis_rules`, one table overridable per model).
"""

from collections.abc import Sequence

MESH_AXES = ("data", "fsdp", "tensor")

# name -> what it labels
LOGICAL_AXES = {
    "batch": "examples of a batch (activations)",
    "length": "sequence positions (activations)",
    "act_embed": "model width of activations",
    "act_heads": "attention heads of activations",
    "act_mlp": "hidden width of MLP activations",
    "embed": "model width of parameters (sharded by FSDP)",
    "mlp": "hidden width of MLP parameters",
    "heads": "attention heads of parameters",
    "kv": "per-head width",
    "vocab": "vocabulary rows of embeddings and output heads",
    "patch": "flattened patch pixels of a patch embedding",
    "position": "rows of a learned position embedding",
    "proj": "output width of a projection head",
    "layers": "stacked layers of a scanned stack",
    "expert": "modality experts of a Mixture-of-Transformers layer (nn.experts)",
}

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("patch", None),
    ("position", None),
    ("proj", "tensor"),
    ("layers", None),  # replicated: FSDP shards the other dimensions
    ("expert", None),  # two modality experts: FSDP and tensor shard inside each
)


def validate_rules(
    rules: Sequence[Sequence],
) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Checks that rules name known logical axes and mesh axes; returns them as tuples."""
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"mesh.rules entry {rule!r} is not a (logical, mesh) pair")
        name, target = rule
        if name not in LOGICAL_AXES:
            raise ValueError(
                f"mesh.rules names unknown logical axis {name!r}; valid: {sorted(LOGICAL_AXES)}"
            )
        targets = () if target is None else (target,) if isinstance(target, str) else target
        for t in targets:
            if t not in MESH_AXES:
                raise ValueError(
                    f"mesh.rules maps {name!r} to unknown mesh axis {t!r}; valid: {MESH_AXES}"
                )
        out.append(
            (name, tuple(targets) if len(targets) > 1 else (targets[0] if targets else None))
        )
    return tuple(out)
