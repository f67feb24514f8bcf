"""Meshes and shardings from one rules table, the memory planner and multi-host start-up."""
from . import distributed
from .jit import jit_sharded, mesh_context, sharded_forward, shardings_like_params
from .mesh import (abstract_mesh, batch_divisor, check_batch, check_mesh, check_mesh_fits, describe_mesh, make_mesh,
                   mesh_sizes, parse_mesh_spec)
from .plan import MemoryPlan, plan_memory
from .rules import IO_AXES, LOGICAL_AXIS_RULES, MESH_AXES, rule_axes
from .shardings import (cache_shardings, io_sharding, logical_spec, logical_to_sharding, param_logical_axes,
                        param_shardings, put_global, shard_params, to_host, tree_shardings)

__all__ = ["distributed", "jit_sharded", "mesh_context", "sharded_forward", "shardings_like_params", "abstract_mesh",
           "batch_divisor", "check_batch", "check_mesh", "check_mesh_fits", "describe_mesh", "make_mesh",
           "mesh_sizes", "parse_mesh_spec", "MemoryPlan", "plan_memory", "IO_AXES", "LOGICAL_AXIS_RULES",
           "MESH_AXES", "rule_axes", "cache_shardings", "io_sharding", "logical_spec", "logical_to_sharding",
           "param_logical_axes", "param_shardings", "put_global", "shard_params", "to_host", "tree_shardings"]
