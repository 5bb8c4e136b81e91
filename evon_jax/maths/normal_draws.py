"""Standard normal draws for the weight noise, regenerated from a key instead of stored.

EVON draws one normal per parameter per call (the next sample) and regenerates the previous
draw from its key (for the Hessian estimate), so the generator's speed is part of the step
cost. On CPU, JAX's threefry bit generation costs about as much as a full set of rotations;
`'hash'` instead draws the bits with a keyed integer hash of the element index (two rounds
of MurmurHash3's 32-bit finaliser, seeded by 64 threefry bits per key, which are hashed
with a stream index so that all leaves of a call share one threefry call) and maps
them to normals with the same inverse-CDF transform `jax.random.normal` uses. It is a few
times faster, stateless and shards like any elementwise op. `'threefry'` is
`jax.random.normal` itself.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import jax
import jax.numpy as jnp

NoiseGenerator = Literal["hash", "threefry"]


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's finaliser: a bijection on uint32 with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive stream indices apart


def stream_seeds(key: jax.Array) -> jax.Array:
  """The 64 threefry bits that seed every stream of one key (one threefry call per key)."""
  return jax.random.bits(key, (2,), jnp.uint32)


def _hash_bits(seeds: jax.Array, streams: Sequence[int], shape) -> jax.Array:
  """Keyed hash of the element index, (len(streams), *shape); stream s (e.g. a leaf's
  index) picks an independent sequence by hashing s into the seeds, so many leaves share
  one threefry call. The streams are data, not constants: one computation serves them all."""
  stream = jnp.asarray(streams, jnp.uint32)
  # uint32 arithmetic wraps: (GOLDEN * (s + 1)) mod 2^32.
  s0 = _fmix32(seeds[0] ^ (jnp.uint32(_GOLDEN) * (stream + jnp.uint32(1))))
  s1 = _fmix32(seeds[1] + stream)
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  column = (len(streams),) + (1,) * len(shape)
  return _fmix32(_fmix32(index[None] ^ s0.reshape(column)) + s1.reshape(column))


def _bits_to_normal(bits: jax.Array) -> jax.Array:
  """23 mantissa bits -> uniform on the open interval (-1, 1) -> sqrt(2) erfinv(u)."""
  one_to_two = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
  uniform = 2.0 * (one_to_two - 1.0) - 1.0 + 2.0 ** -23
  return math.sqrt(2.0) * jax.lax.erf_inv(uniform)


def standard_normal(key: jax.Array, shape, dtype=jnp.float32,
                    generator: NoiseGenerator = "hash") -> jax.Array:
  """N(0, 1) draws of `shape`, a deterministic function of `key` (and the generator)."""
  if generator == "threefry":
    return jax.random.normal(key, shape, dtype)
  return standard_normal_from_seeds(stream_seeds(key), 0, shape, dtype)


def standard_normal_from_seeds(seeds: jax.Array, stream: int, shape,
                               dtype=jnp.float32) -> jax.Array:
  """'hash' draws of stream `stream` under `stream_seeds(key)`: independent across streams."""
  return _bits_to_normal(_hash_bits(seeds, [stream], tuple(shape))[0]).astype(dtype)


def standard_normals_from_seeds(seeds: jax.Array, requests: Sequence) -> list:
  """Many draws of one key: `requests[i]` is (stream, shape, dtype) or None (no draw).

  Equal to `standard_normal_from_seeds` per request; requests of one shape and dtype are
  drawn as one (k, *shape) array. XLA compiles a computation per distinct draw, so a model
  whose layers repeat shapes (a transformer's blocks) pays for one draw per shape, not one
  per leaf; the block is materialised (its consumers are rotations or IVON's elementwise
  update; measured no slower than drawing inside each consumer).
  """
  groups: dict = {}
  for position, request in enumerate(requests):
    if request is not None:
      stream, shape, dtype = request
      groups.setdefault((tuple(shape), jnp.dtype(dtype)), []).append((position, stream))
  out: list = [None] * len(requests)
  for (shape, dtype), members in groups.items():
    block = _bits_to_normal(_hash_bits(seeds, [s for _, s in members], shape)).astype(dtype)
    # Materialised once: without the barrier XLA fuses a copy of the whole draw into each
    # leaf's consumer, and compiles one per leaf again.
    block = jax.lax.optimization_barrier(block)
    for row, (position, _) in enumerate(members):
      out[position] = block[row]
  return out
