export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
for lr in 0.05 0.1 0.2; do for hi in 0.1 0.3 1.0; do for wd in 1e-3 5e-3 1e-2; do echo "$lr $hi $wd 1500 0"; done; done; done | xargs -P 16 -L 1 sh -c 'python3 tune_tmp.py $0 $1 $2 $3 $4 2>&1 | tail -1' > $OUT/tune.jsonl
cat $OUT/tune.jsonl
