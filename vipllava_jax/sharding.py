"""Moved to `vipllava_jax.parallel` (mesh.py, shardings.py, jit.py) and `vipllava_jax.generation`
(sharded_generate); these names stay importable."""
from .generation.api import sharded_generate
from .models.params import abstract_param_tree
from .parallel.jit import ShardedJit, jit_sharded, mesh_context, sharded_forward, shardings_like_params
from .parallel.mesh import (abstract_mesh, batch_divisor, check_batch, check_mesh_fits, describe_mesh, logical_dims,
                            make_mesh, mesh_sizes, parse_mesh_spec)
from .parallel.rules import LOGICAL_AXIS_RULES, rule_axes
from .parallel.shardings import (cache_shardings, io_sharding, logical_sharding, logical_spec, logical_to_sharding,
                                 pad_batch_inputs, param_logical_axes, param_shardings, put_global, shard_params,
                                 shard_shape, to_host, tree_shardings)


def param_sharding_tree(config, mesh, rules=LOGICAL_AXIS_RULES, *, scan_layers: bool = False):
    """The old name (and argument order) of `parallel.shardings.param_shardings`."""
    return param_shardings(config, mesh, scan_layers=scan_layers, rules=rules)


__all__ = ["sharded_generate", "abstract_param_tree", "ShardedJit", "jit_sharded", "mesh_context", "sharded_forward",
           "shardings_like_params", "abstract_mesh", "batch_divisor", "check_batch", "check_mesh_fits",
           "describe_mesh", "logical_dims", "make_mesh", "mesh_sizes", "parse_mesh_spec", "LOGICAL_AXIS_RULES",
           "rule_axes", "cache_shardings", "io_sharding", "logical_sharding", "logical_spec", "logical_to_sharding",
           "pad_batch_inputs", "param_logical_axes", "param_sharding_tree", "param_shardings", "put_global",
           "shard_params", "shard_shape", "to_host", "tree_shardings"]
