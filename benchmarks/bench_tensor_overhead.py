"""What an update costs per tensor before any byte of it moves: the extension's reading of each
tensor's DenseTensor and allocation, timed where it matters, right after a large update has
pushed that memory out of the cache ("cold"), and again at once ("warm").

The pairs hold 16 float32 elements each, so the time is almost all per-tensor work (the Python
lists, the type checks, FactsOf). The cold figure is the one a training step sees: between two
EMA updates the forward and backward passes stream far more than the cache holds. It is the
figure `PrefetchFacts` (csrc/ema_tensors.h) lowers; to compare builds, run this script once per
build (each source text gets its own cached library).

    PYTHONPATH=. python benchmarks/bench_tensor_overhead.py [--pairs 1000,3000] [--rounds 300] [--threads N]
                                                          [--json out.json]
"""

import argparse
import os
import platform
import statistics
import time

from reporting import write_json

FLUSH_ELEMENTS = 16 << 20  # a lerp over two 64 MB buffers: twice the 32 MB last-level cache here


def measure(pairs, rounds):
    import paddle
    from paddle_ema.kernels import fused

    values = [paddle.randn([16]) for _ in range(pairs)]
    averages = [v.clone() for v in values]
    big_a, big_x = paddle.zeros([FLUSH_ELEMENTS]), paddle.ones([FLUSH_ELEMENTS])
    cold, warm = [], []
    for _ in range(rounds):
        fused.lerp_([big_a], [big_x], 0.5)
        start = time.perf_counter()
        fused.lerp_(averages, values, 2e-4)
        cold.append((time.perf_counter() - start) * 1e6)
        start = time.perf_counter()
        fused.lerp_(averages, values, 2e-4)
        warm.append((time.perf_counter() - start) * 1e6)
    return statistics.median(cold), statistics.median(warm)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="1000,3000", help="comma-separated list sizes")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=0, help="$PADDLE_EMA_NUM_THREADS (0: every CPU)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["PADDLE_EMA_NUM_THREADS"] = str(args.threads)
    import paddle
    from paddle_ema.kernels import fused

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Paddle {paddle.__version__}, "
          f"{fused.num_threads()} EMA thread(s), {args.rounds} rounds, medians")
    print(f"{'pairs':>6} | {'cold (us)':>9} | {'warm (us)':>9} | {'cold us/pair':>12} | cold/warm")
    rows = []
    for pairs in (int(p) for p in args.pairs.split(",")):
        cold, warm = measure(pairs, args.rounds)
        rows.append({"pairs": pairs, "cold_us": cold, "warm_us": warm})
        print(f"{pairs:>6} | {cold:>9.1f} | {warm:>9.1f} | {cold / pairs:>12.3f} | {cold / warm:.2f}")
    if args.json:
        write_json(args.json, {"rows": rows, "threads": fused.num_threads(), "paddle": paddle.__version__})


if __name__ == "__main__":
    main()
