"""EK-FAC Laplace vs the dense full-GGN Laplace on the two-moons MAP network of
`benchmarks.posteriors` (4482 parameters): the log evidence and the linearised predictive's
test NLL at several prior precisions λ.

    python -m benchmarks.laplace_full_ggn     # ~1.5 min on 2 CPU cores

Shows whether the post-hoc Laplace's underfitting at the evidence-optimal λ comes from the
Kronecker approximation or from the single isotropic λ (the dense GGN behaves the same way).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from benchmarks import posteriors as P
from evon_jax import laplace, metrics, predictive


def main():
  C = P.classify
  data = P.load_moons(0)
  config = dict(P.CONFIGS["moons"])
  setting = P.method_settings("moons")["MAP"]
  init_key, train_key, _ = P._keys(0)
  params, _ = C.train(C._adamw(setting, config["steps"]),
                      C.init_mlp(init_key, P._sizes(data, config)), data.x_train,
                      data.y_train, config["steps"], train_key)
  flat, unravel = ravel_pytree(params)
  x = jnp.asarray(data.x_train)
  jac = np.asarray(jax.jacfwd(lambda f: C.apply_fn(unravel(f), x))(flat), np.float64)
  p = np.asarray(jax.nn.softmax(C.apply_fn(params, x), -1), np.float64)
  output_hessian = np.stack([np.diag(q) - np.outer(q, q) for q in p])
  ggn = np.einsum("nkp,nkl,nlq->pq", jac, output_hessian, jac)
  train = (data.x_train, data.y_train)
  state = laplace.fit(C.apply_fn, params, train, likelihood="classification")
  log_lik = float(laplace.log_likelihood(C.apply_fn, params, train, likelihood="classification"))
  x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  jac_test = np.asarray(jax.jacfwd(lambda f: C.apply_fn(unravel(f), x_test))(flat), np.float64)
  logits_test = np.asarray(C.apply_fn(params, x_test), np.float64)
  flat64, dim = np.asarray(flat, np.float64), flat.shape[0]
  rng = np.random.default_rng(0)

  def dense_evidence(lam):
    _, logdet = np.linalg.slogdet(ggn + lam * np.eye(dim))
    return log_lik - 0.5 * lam * flat64 @ flat64 + 0.5 * dim * np.log(lam) - 0.5 * logdet

  def dense_linearised_nll(lam, num_samples=64):
    chol = np.linalg.cholesky(np.linalg.inv(ggn + lam * np.eye(dim)))
    deviations = rng.standard_normal((num_samples, dim)) @ chol.T
    logits = logits_test[None] + np.einsum("nkp,sp->snk", jac_test, deviations)
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1).mean(0)
    return float(metrics.nll(probs, y_test))

  print("λ | log evidence EK-FAC | dense | linearised NLL EK-FAC | dense")
  for lam in (0.1, 0.475, 1.0, 10.0, 100.0):
    tuned = laplace.with_prior_precision(state, lam)
    probs = predictive.linearized_predictive(jax.random.key(1), C.apply_fn, tuned, x_test, 64)
    print(f"{lam} | {float(laplace.log_marginal_likelihood(tuned, log_lik)):.1f} | "
          f"{dense_evidence(lam):.1f} | {float(metrics.nll(probs, y_test)):.4f} | "
          f"{dense_linearised_nll(lam):.4f}")


if __name__ == "__main__":
  main()
