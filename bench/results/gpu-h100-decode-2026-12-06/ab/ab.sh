# Run 3 (device call 6, one warm H100): 4039d05 (old decode kernel) and this build alternated;
# the first 8 x 32K run of each warms the driver's PTX JIT cache (a fresh machine's first long
# decode step stalls 2.5-5 s on it, which inflates a mean).
set -e
for i in 1 2; do for v in old new; do
  d=$OUT/$v-$i; mkdir -p $d
  if [ $v = old ]; then A=/tmp/apb-old; else A=/tmp/apb-bin/apb; fi
  APB=$A OUT=$d N=8 P=32768 T=64 SEQS=1 bash scripts/device-batch.sh > $d/log32k.txt 2>&1 || echo "$v failed"
  echo "$v-$i 32k peer: $(grep -h '^apb_decode_step_seconds_sum\|^apb_decode_step_seconds_count' $d/batch-1-load-metrics.txt | awk '{print $2}' | tr '\n' ' ')"
  if [ $i = 2 ]; then
    APB=$A OUT=$d N=32 P=4096 T=128 SEQS=32 bash scripts/device-batch.sh > $d/log4k.txt 2>&1 || echo "$v failed"
    echo "$v-$i 4k batched: $(grep -h '^apb_decode_step_seconds_sum\|^apb_decode_step_seconds_count\|^apb_decode_batch_size_sum' $d/batch-32-load-metrics.txt | awk '{print $2}' | tr '\n' ' ')"
  fi
  rm -f $d/batch-serve-*.txt $d/batch-metrics-*.txt
done; done
# Printed (2026-12-06, H100):
# old-1 32k peer: 4.504475011000001 514
# new-1 32k peer: 4.415999414 514
# old-2 32k peer: 4.498191144000002 514
# old-2 4k batched: 4074 2.2070047499999994 161
# new-2 32k peer: 4.426810655000002 514
# new-2 4k batched: 4074 2.1982007359999995 161
