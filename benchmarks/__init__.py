"""Benchmarks of evon_jax against optax's AdamW and (optionally) the PyTorch peers.

Run everything with ``python -m benchmarks.run`` (``--quick`` for a < 1 minute smoke run).
Modules: `common` (shapes, optimizers, interleaved timing, machine description),
`optimizer_step` (one optimizer step, growth with size), `train_step` (a small Flax NNX
GPT), `memory` (state bytes, peak RSS), `pieces` (the linear-algebra and PRNG pieces a step
is made of), `peers` (ivon-opt and pytorch-optimizer's SOAP), `plots`.
"""
