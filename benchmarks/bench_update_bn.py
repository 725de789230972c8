"""update_bn against the forward passes it needs: the same batches through the model in training
mode under no_grad, then update_bn over them, alternating, medians.

    PYTHONPATH=. python benchmarks/bench_update_bn.py [--batches 6] [--batch 16] [--size 64] [--runs 5]
                                                      [--json out.json]
"""

import argparse
import statistics
import time

from reporting import write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    import paddle
    from paddle.vision.models import resnet18

    from paddle_ema.batchnorm import update_bn

    model = resnet18(num_classes=10)
    data = [paddle.randn([args.batch, 3, args.size, args.size]) for _ in range(args.batches)]

    def forward():
        model.train()
        with paddle.no_grad():
            for x in data:
                model(x)

    forward()
    update_bn(model, data)
    times = {"forward": [], "update_bn": []}
    for _ in range(args.runs):
        for name, fn in (("forward", forward), ("update_bn", lambda: update_bn(model, data))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    f, u = statistics.median(times["forward"]), statistics.median(times["update_bn"])
    print(f"ResNet-18, {args.batches} batches of {args.batch} x 3x{args.size}x{args.size}: "
          f"forward {f:.3f} s, update_bn {u:.3f} s, ratio {u / f:.3f}")
    write_json(args.json, {"forward_s": f, "update_bn_s": u, "ratio": u / f, "runs": args.runs})


if __name__ == "__main__":
    main()
