"""Standard normal draws for the weight noise, regenerated from a key instead of stored.

EVON draws one normal per parameter per call (the next sample) and regenerates the previous
draw from its key (for the Hessian estimate), so the generator's speed is part of the step
cost. On CPU, JAX's threefry bit generation costs about as much as a full set of rotations;
`'hash'` instead draws the bits with a keyed integer hash of the element index (two rounds
of MurmurHash3's 32-bit finaliser, seeded by 64 threefry bits per key, which are hashed
with a stream index so that all leaves of a call share one threefry call) and maps
them to normals by the inverse CDF, as `jax.random.normal` does (with an erfinv more
accurate on the draws' grid than `lax.erf_inv`, see `_erfinv_on_grid`). It is a few
times faster, stateless and shards like any elementwise op. `'threefry'` is
`jax.random.normal` itself.
"""

from __future__ import annotations

import functools
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


# erfinv(u) = u · p(w), w = -log(1 - u²): Giles's single-precision polynomials ("Approximating
# the erfinv function", GPU Computing Gems, 2011), one for w < 5 in w - 2.5 and one for the
# tails (|u| > 0.9966) in √w - 3, highest degree first.
_ERFINV_CENTRAL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06,
                   0.00021858087, -0.00125372503, -0.00417768164, 0.246640727, 1.50140941)
_ERFINV_TAIL = (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844,
                0.00573950773, -0.0076224613, 0.00943887047, 1.00167406, 2.83297682)


def _polynomial(coefficients, w: jax.Array) -> jax.Array:
  value = jnp.full_like(w, coefficients[0])
  for c in coefficients[1:]:
    value = value * w + c
  return value


def _erfinv_on_grid(uniform: jax.Array) -> jax.Array:
  """erfinv of points of the grid (k + ½)·2⁻²² in (-1, 1).

  On that grid 1 - u and 1 + u are exact, so w = -log((1 - u)(1 + u)) carries one rounding
  where `lax.erf_inv`'s -log1p(-u·u) carries the rounding of u·u, which near |u| = 1 is most
  of 1 - u². Measured against scipy's float64 erfinv over 3.1 M draws: relative error
  ≤ 2.9e-7 (`lax.erf_inv`: 5.8e-6). Alone the draw is ~25 % faster on CPU (no log1p);
  inside EVON's step the difference is within the noise.
  """
  w = -jnp.log((1.0 - uniform) * (1.0 + uniform))
  central = _polynomial(_ERFINV_CENTRAL, w - 2.5)
  tail = _polynomial(_ERFINV_TAIL, jnp.sqrt(w) - 3.0)
  return jnp.where(w < 5.0, central, tail) * uniform


def _bits_to_normal(bits: jax.Array) -> jax.Array:
  """23 mantissa bits -> uniform on the open interval (-1, 1) -> sqrt(2) erfinv(u)."""
  one_to_two = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
  uniform = 2.0 * (one_to_two - 1.0) - 1.0 + 2.0 ** -23
  return math.sqrt(2.0) * _erfinv_on_grid(uniform)


def standard_normal(key: jax.Array, shape, dtype=jnp.float32,
                    generator: NoiseGenerator = "hash") -> jax.Array:
  """N(0, 1) draws of `shape`, a deterministic function of `key` (and the generator)."""
  if generator == "threefry":
    return jax.random.normal(key, shape, dtype)
  return standard_normal_from_seeds(stream_seeds(key), 0, shape, dtype)


def standard_normal_from_seeds(seeds: jax.Array, stream: int, shape,
                               dtype=jnp.float32) -> jax.Array:
  """'hash' draws of stream `stream` under `stream_seeds(key)`: independent across streams."""
  return _draws(seeds, jnp.asarray([stream], jnp.uint32), shape=tuple(shape),
                dtype=jnp.dtype(dtype))[0]


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _draws(seeds: jax.Array, streams: jax.Array, *, shape, dtype) -> jax.Array:
  """The draws of `streams` (a uint32 vector), (len(streams), *shape): traced once per
  (number of streams, shape, dtype), the streams being an argument."""
  return _bits_to_normal(_hash_bits(seeds, streams, shape)).astype(dtype)


# Leaves of at least this many entries get a draw of their own, fused into its consumer;
# smaller ones are drawn together per shape (see `standard_normals_from_seeds`).
FUSED_DRAW_MIN_SIZE = 2 ** 15


def standard_normals_from_seeds(seeds: jax.Array, requests: Sequence) -> list:
  """Many draws of one key: `requests[i]` is (stream, shape, dtype) or None (no draw).

  Equal to `standard_normal_from_seeds` per request (up to the float rounding of where XLA
  puts the computation). A leaf of `FUSED_DRAW_MIN_SIZE` entries or more is drawn on its
  own: XLA fuses the whole draw (hash, log, polynomials) into the one elementwise pass that
  consumes it, and never writes it to memory; all such leaves of one shape and dtype call
  one traced function (`_draws`). Smaller leaves of one shape and dtype are drawn as
  one (k, *shape) block, so that a model of many small layers compiles one draw per shape
  rather than per leaf. (Until 2026-12-07 every leaf went into such a block, behind an
  `optimization_barrier` meant to keep it in memory; XLA's CPU pipeline drops the barrier,
  and the block's slices made it write the log and the square root of every draw to memory
  and hash each element twice: EVON's non-refresh step was 5 ms (4 %) slower on
  `benchmarks.run`'s d = 256 shapes. Fusing the small leaves' draws too cost 1.2 s more XLA
  compile time on `benchmarks.compile_time`'s 12-layer model of 48 small leaves.)
  """
  out: list = [None] * len(requests)
  groups: dict = {}
  for position, request in enumerate(requests):
    if request is None:
      continue
    stream, shape, dtype = request
    if math.prod(shape) >= FUSED_DRAW_MIN_SIZE:
      out[position] = standard_normal_from_seeds(seeds, stream, shape, dtype)
    else:
      groups.setdefault((tuple(shape), jnp.dtype(dtype)), []).append((position, stream))
  for (shape, dtype), members in groups.items():
    block = _draws(seeds, jnp.asarray([s for _, s in members], jnp.uint32), shape=shape,
                   dtype=dtype)
    for row, (position, _) in enumerate(members):
      out[position] = block[row]
  return out
