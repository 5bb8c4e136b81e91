"""Optimizer-state and communication bytes for GPT-2-small shapes (numbers in docs/scaling.md).

State sizes are read off the real optimizer states with `jax.eval_shape(tx.init, params)`
(shapes only, nothing is allocated), so they follow the implementation's defaults
(max_precond_dim=10000, precondition_1d=False, float32 statistics). Run:

    python docs/scaling_bytes.py
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

import evon_jax

LAYERS, D, VOCAB, CONTEXT = 12, 768, 50257, 1024
MIB = 2**20


def gpt2_small_params(dtype=jnp.float32):
  f = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  layer = lambda: {
      "ln_1": {"scale": f(D), "bias": f(D)},
      "attn": {"qkv": {"kernel": f(D, 3 * D), "bias": f(3 * D)},
               "proj": {"kernel": f(D, D), "bias": f(D)}},
      "ln_2": {"scale": f(D), "bias": f(D)},
      "mlp": {"fc": {"kernel": f(D, 4 * D), "bias": f(4 * D)},
              "proj": {"kernel": f(4 * D, D), "bias": f(D)}},
  }
  return {"wte": f(VOCAB, D), "wpe": f(CONTEXT, D), "ln_f": {"scale": f(D), "bias": f(D)},
          "h": [layer() for _ in range(LAYERS)]}  # lm_head tied to wte


def nbytes(tree):
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key))


def main():
  params = gpt2_small_params()
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  p_bytes = nbytes(params)
  print(f"parameters: {n:,} ({p_bytes / MIB:.1f} MiB in float32)")

  evon = jax.eval_shape(evon_jax.evon(1e-3, ess=1e9, hess_init=0.1).init, params)
  soap = jax.eval_shape(evon_jax.soap(1e-3).init, params)
  adamw = jax.eval_shape(optax.adamw(1e-3).init, params)
  kron = nbytes(evon.factors) + nbytes(evon.bases)
  rows = [
      ("AdamW (mu, nu)", nbytes(adamw)),
      ("SOAP (mu, nu, factors, bases)", nbytes(soap)),
      ("EVON (mean, momentum, H, factors, bases)", nbytes(evon)),
  ]
  print("\nstate bytes, float32:")
  for name, b in rows:
    print(f"  {name:44s} {b / MIB:8.1f} MiB  = {b / p_bytes:5.2f} x params")
  print(f"  of which Kronecker factors + bases: {kron / MIB:.1f} MiB "
        f"(factors {nbytes(evon.factors) / MIB:.1f}, bases {nbytes(evon.bases) / MIB:.1f})")

  print("\nper matrix leaf (float32; a side > max_precond_dim = 10000 keeps the identity):")
  leaves = {"attn qkv": (D, 3 * D), "attn proj": (D, D), "mlp fc": (D, 4 * D),
            "mlp proj": (4 * D, D), "wpe": (CONTEXT, D), "wte": (VOCAB, D)}
  for name, (m, k) in leaves.items():
    sides = sum(s * s for s in (m, k) if 1 < s <= 10000)
    print(f"  {name:10s} {str((m, k)):14s} params {4 * m * k / MIB:6.1f} MiB   "
          f"L+R {4 * sides / MIB:5.1f} MiB   Q_L+Q_R {4 * sides / MIB:5.1f} MiB")

  # Communication per step and data-parallel replica (bytes that each replica contributes to an
  # all-reduce; a ring all-reduce sends and receives about 2 (N-1)/N times that per device).
  matrix_entries = n  # every trainable leaf contributes its size to each params-sized statistic
  grads = 4 * n
  shared_stats = 3 * 4 * matrix_entries  # pmean of g°, z ⊙ g°, g  (factor_statistic='mean_gradient')
  per_sample_outer = 4 * sum(
      (m * m if 1 < m <= 10000 else 0) + (k * k if 1 < k <= 10000 else 0)
      for m, k in ((x.shape[0], x.shape[1]) for x in jax.tree.leaves(params) if len(x.shape) == 2))
  per_sample_stats = 2 * 4 * matrix_entries + per_sample_outer
  print("\nall-reduce payload per step and replica:")
  print(f"  gradients (AdamW, SOAP, EVON under jit/pjit):       {grads / MIB:8.1f} MiB")
  print(f"  EVON under axis_name, replica_noise='shared':     {grads / MIB:8.1f} MiB"
        " (the gradient: every statistic is linear in it)")
  print(f"  EVON under axis_name, 'independent', mean_gradient: {shared_stats / MIB:8.1f} MiB"
        " (g°, z⊙g°, g)")
  print(f"  EVON under axis_name, 'independent', per_sample:  {per_sample_stats / MIB:8.1f} MiB"
        " (g°, z⊙g°, per-sample L and R)")
  print(f"  ... in bfloat16 gradients: {grads / 2 / MIB:.1f} MiB")
  # Matmul FLOPs of one non-refresh EVON/SOAP step (2 flops per multiply-add): per matrix the
  # factor statistics g gᵀ, gᵀ g, the rotation in Q_Lᵀ G Q_R and the rotation out Q_L X Q_Rᵀ,
  # each m²n (left side) + mn² (right side) for the sides that are rotated.
  flops = 0
  for x in jax.tree.leaves(params):
    if len(x.shape) == 2:
      m, k = x.shape
      flops += 2 * 3 * ((m * m * k if 1 < m <= 10000 else 0) + (m * k * k if 1 < k <= 10000 else 0))
  tokens = 512 * CONTEXT
  print(f"\nEVON/SOAP matmul FLOPs per step: {flops / 1e12:.2f} TFLOP; model fwd+bwd for a "
        f"512 x 1024-token batch: {6 * n * tokens / 1e12:.0f} TFLOP "
        f"(optimizer {100 * flops / (6 * n * tokens):.1f}%)")

  print("\nstate per device with every state array sharded N ways (FSDP / ZeRO-3 style):")
  for devices in (8, 64):
    print(f"  N = {devices:3d}: " + ", ".join(
        f"{name.split(' ')[0]} {b / devices / MIB:.0f} MiB" for name, b in rows))
  factor_bytes = nbytes(evon.factors)
  print(f"\nrefresh step, FSDP-sharded factors: all-gather of the factors "
        f"{factor_bytes / MIB:.1f} MiB in total (eigh/QR are not partitioned)")


if __name__ == "__main__":
  main()
