"""The device mesh and logical-axis sharding.

Mesh axes are (data, fsdp, tensor, sequence). Each is the product of an ici_* (within a slice) and a
dcn_* (across slices) parallelism from the config; one -1 in each group takes what is left. Every
parameter and large activation names its dimensions with logical axes (batch, embed, heads, ...);
`logical_axis_rules` maps those names to mesh axes, so changing parallelism never changes code.
"""

from collections.abc import Mapping, Sequence
import math

import jax
from flax.core import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tunix_core.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
# Every logical axis name that parameters and activations use; each needs a rule ([] = replicated).
LOGICAL_AXES = ("batch", "activation_batch", "activation_length", "activation_embed", "activation_heads",
                "activation_kv_heads", "activation_mlp", "activation_vocab", "embed", "heads", "kv_heads", "mlp",
                "vocab", "head_dim", "layers", "norm")


def _fill(group: str, sizes: dict[str, int], total: int) -> dict[str, int]:
  """Replaces the one -1 in `sizes` so that their product is `total`."""
  keys = [f"{group}_{axis}_parallelism" for axis in MESH_AXES]
  unknown = [axis for axis in MESH_AXES if sizes[axis] == -1]
  if len(unknown) > 1:
    raise UserError(f"at most one {group}_*_parallelism may be -1; got -1 for {', '.join(unknown)}")
  bad = [f"{k}={sizes[a]}" for k, a in zip(keys, MESH_AXES) if sizes[a] == 0 or sizes[a] < -1]
  if bad:
    raise UserError(f"{', '.join(bad)}: parallelism must be a positive integer or -1")
  known = math.prod(v for v in sizes.values() if v != -1)
  if unknown:
    if total % known:
      raise UserError(f"{group}_*_parallelism: the fixed axes multiply to {known}, which does not divide the "
                      f"{total} {'devices per slice' if group == 'ici' else 'slices'}; change them")
    sizes = {**sizes, unknown[0]: total // known}
  elif known != total:
    shown = " x ".join(f"{k}={sizes[a]}" for k, a in zip(keys, MESH_AXES))
    raise UserError(f"{shown} = {known}, but there are {total} "
                    f"{'devices per slice' if group == 'ici' else 'slices'}; make the product {total} or set one to -1")
  return sizes


def resolve_parallelism(parallelism: Mapping[str, int], num_devices: int, num_slices: int = 1
                        ) -> dict[str, dict[str, int]]:
  """Returns {"ici": {axis: size}, "dcn": {axis: size}} with every -1 resolved."""
  if num_devices % num_slices:
    raise UserError(f"{num_devices} devices do not split into {num_slices} slices")
  ici = _fill("ici", {a: int(parallelism[f"ici_{a}_parallelism"]) for a in MESH_AXES}, num_devices // num_slices)
  dcn = _fill("dcn", {a: int(parallelism[f"dcn_{a}_parallelism"]) for a in MESH_AXES}, num_slices)
  return {"ici": ici, "dcn": dcn}


def num_slices(devices: Sequence[jax.Device]) -> int:
  """TPU multislice jobs number their slices; everything else is one slice."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def build_mesh(config) -> Mesh:
  """The (data, fsdp, tensor, sequence) mesh for the config's resolved parallelism."""
  devices = jax.devices()
  sizes = resolve_parallelism(config, len(devices), num_slices(devices))
  ici = tuple(sizes["ici"][a] for a in MESH_AXES)
  dcn = tuple(sizes["dcn"][a] for a in MESH_AXES)
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn) > 1:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    device_grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(device_grid, MESH_AXES, axis_types=axis_types)
  return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)


def logical_rules(config) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """The config's logical_axis_rules in the form flax's `nnx.logical_axis_rules` takes."""
  rules = []
  for entry in config.logical_axis_rules:
    if len(entry) != 2 or not isinstance(entry[0], str):
      raise UserError(f"logical_axis_rules entry {list(entry)!r}: expected [logical_name, [mesh_axes...]]")
    name, axes = entry
    axes = [axes] if isinstance(axes, str) else list(axes)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise UserError(f"logical_axis_rules for {name!r} names mesh axes {unknown}; mesh axes are {list(MESH_AXES)}")
    rules.append((name, tuple(axes) if len(axes) > 1 else (axes[0] if axes else None)))
  missing = [name for name in LOGICAL_AXES if name not in {rule[0] for rule in rules}]
  if missing:
    raise UserError(f"logical_axis_rules has no rule for {', '.join(missing)}; add e.g. [\"{missing[0]}\", []] "
                    f"to replicate it (see configs/base.yml)")
  return tuple(rules)


def logical_to_spec(logical_axes: Sequence[str | None],
                    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec with `rules` (default: the active flax rules)."""
  table = dict(rules if rules is not None else spmd.get_logical_axis_rules())
  return PartitionSpec(*(table.get(name) if name is not None else None for name in logical_axes))


def shard_activation(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding inside jit; a no-op when no mesh is active."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def shard_count(logical_axis: str) -> int:
  """How many ways the active mesh and rules split activations along logical_axis (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = logical_to_spec((logical_axis,))[0]
  axes = (axes,) if isinstance(axes, str) else (axes or ())
  return math.prod(mesh.shape[axis] for axis in axes)


def batch_sharding(mesh: Mesh, rules, leading_axes: int = 0) -> NamedSharding:
  """Sharding of a [..., batch, length] input array: `leading_axes` replicated axes come first."""
  spec = logical_to_spec(("activation_batch", "activation_length"), rules)
  return NamedSharding(mesh, PartitionSpec(*([None] * leading_axes), *spec))
