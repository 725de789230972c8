"""The benchmark's baselines really do the work they are timed for: their averages against
paddle_ema's ModelEMA (PaddleDetection's numbers) and a float64 model of the seed's formula."""

import sys
from pathlib import Path

import numpy as np
import paddle

from paddle_ema.ppdet import ModelEMA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_update import DetectionModelEMA, SeedTutorialEMA, build_model, set_shapes  # noqa: E402


def _net():
    return paddle.nn.Sequential(paddle.nn.Linear(5, 4), paddle.nn.BatchNorm1D(4), paddle.nn.Linear(4, 2))


def _perturb(net, rng):
    for p in net.parameters():
        p.set_value(p.numpy() + rng.standard_normal(p.shape).astype(p.numpy().dtype))


def test_detection_baseline_matches_model_ema():
    rng = np.random.default_rng(0)
    net = _net()
    baseline, drop_in = DetectionModelEMA(net, 0.9), ModelEMA(net, decay=0.9, ema_decay_type="threshold")
    for _ in range(4):
        _perturb(net, rng)  # BatchNorm statistics move too: both average every state entry
        baseline.update()
        drop_in.update()
    assert set(baseline.state_dict) == set(drop_in.state_dict)
    for name, tensor in baseline.state_dict.items():
        np.testing.assert_allclose(tensor.numpy(), drop_in.state_dict[name].numpy(), rtol=1e-6, atol=1e-7)


def test_seed_baseline_matches_float64_threshold_average():
    rng = np.random.default_rng(1)
    net = _net()
    seed = SeedTutorialEMA(net, 0.9)
    trainable = {n: p for n, p in net.named_parameters() if not p.stop_gradient}
    expected = {n: p.numpy().astype("float64") for n, p in trainable.items()}
    assert set(seed._shadow) == set(trainable)  # BatchNorm statistics are not averaged
    for t in range(4):
        _perturb(net, rng)
        seed.update()
        d = min(0.9, (1 + t) / (10 + t))
        for n, p in trainable.items():
            expected[n] = d * expected[n] + (1 - d) * p.numpy().astype("float64")
    for n in trainable:
        np.testing.assert_allclose(seed._shadow[n], expected[n], rtol=1e-6)


def test_transformer_set_has_a_thousand_tensors():
    model = build_model("transformer1000")
    shapes = [list(p.shape) for p in model.parameters()]
    assert len(shapes) == 1000 and shapes == set_shapes("transformer1000")
    assert sum(int(np.prod(s)) for s in shapes) == 13_399_426
