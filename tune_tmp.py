import json, sys, time
import jax, jax.numpy as jnp, optax
import evon_jax
from evon_jax import demo, metrics, predictive
lr, hi, wd, steps, seed = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
b1 = float(sys.argv[6]) if len(sys.argv) > 6 else 0.95
t0 = time.time()
data = demo.load_data(seed)
apply_fn, p0 = demo.make_model(seed, 64)
import io, contextlib
tx = evon_jax.evon(optax.cosine_decay_schedule(lr, steps), ess=float(data.x_train.shape[0]), hess_init=hi, weight_decay=wd, b2=0.99999, b1=b1, key=seed)
with contextlib.redirect_stdout(io.StringIO()):
  _, st = demo.train(tx, apply_fn, p0, data, steps, seed, "evon")
key = jax.random.key(seed + 1)
out = {"lr": lr, "hi": hi, "wd": wd, "b1": b1, "seed": seed}
pm = predictive.mean_predictive(apply_fn, st, data.x_test)
sp = predictive.sample_predictive(apply_fn, st, data.x_test, key, 32)
pb = sp.mean(0)
for name, p in [("mean", pm), ("bma", pb)]:
  e = demo.evaluate(p, data.y_test)
  out.update({f"{name}_{k}": round(v, 4) for k, v in e.items()})
hin = metrics.predictive_entropy(pb)
for n, x in data.ood.items():
  hout = metrics.predictive_entropy(predictive.bayesian_model_average(apply_fn, st, x, key, 32))
  out["auroc_" + n.split()[0]] = round(float(metrics.ood_auroc(hin, hout)), 4)
out["Hin"] = round(float(hin.mean()), 3)
out["sec"] = round(time.time() - t0, 1)
print(json.dumps(out), flush=True)
