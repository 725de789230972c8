"""Accuracy of raw, EMA, EMA + update_bn, SWA and the best post-hoc EMA on a config, over seeds.

    python benchmarks/accuracy_table.py [-c configs/lenet_digits.yml] [--seeds 0 1 2]

For each seed it runs tools/train.py twice (the training is deterministic, so both runs see the
same weights): once with SWA and post-hoc snapshots on, once with ema_update_bn on; then
tools/posthoc_ema.py sweeps EMA widths with --eval. It prints a markdown table of the final
accuracies, with mean and sample standard deviation. Note that "best post-hoc" picks the best of
the sweep on the test set itself, so it is optimistic by construction.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tool, *args):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": ""})
    if result.returncode:
        sys.exit(f"{tool} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.stdout


def final(pattern, text):
    return float(re.search(pattern, text).group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=str(ROOT / "configs" / "lenet_digits.yml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows = {"raw": [], "EMA": [], "EMA + update_bn": [], "SWA": [], "best post-hoc EMA": []}
    chosen = []
    for seed in args.seeds:
        out = tempfile.mkdtemp(prefix=f"acc_seed{seed}_")
        common = ["-c", args.config, "-o", f"seed={seed}", f"output_dir={out}"]
        text = run("train.py", *common[:2], "--eval", *common[2:], "use_swa=true", "ema_posthoc=true")
        rows["raw"].append(final(r"final: raw ([\d.]+)", text))
        rows["EMA"].append(final(r"final: raw [\d.]+, EMA ([\d.]+)", text))
        rows["SWA"].append(final(r"final: .*SWA ([\d.]+)", text))
        sweep = run("posthoc_ema.py", *common[:2], "--eval", *common[2:])
        rows["best post-hoc EMA"].append(final(r"best: .*accuracy ([\d.]+)", sweep))
        chosen.append(re.search(r"best: sigma_rel ([\d.]+)", sweep).group(1))
        out_bn = tempfile.mkdtemp(prefix=f"acc_bn_seed{seed}_")
        text = run("train.py", "-c", args.config, "--eval", "-o", f"seed={seed}", f"output_dir={out_bn}",
                   "ema_update_bn=true")
        rows["EMA + update_bn"].append(final(r"final: raw [\d.]+, EMA ([\d.]+)", text))
    print(f"config {os.path.relpath(args.config, ROOT)}, seeds {args.seeds}; final-epoch test accuracy")
    print("| weights | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± sd |")
    print("| --- |" + " ---: |" * (len(args.seeds) + 1))
    for name, values in rows.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {statistics.mean(values):.4f} ± {spread:.4f} |")
    print(f"best post-hoc sigma_rel per seed: {', '.join(chosen)}")


if __name__ == "__main__":
    main()
