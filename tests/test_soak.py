"""Soak: many EMA updates on a small model; memory flat and values on the float64 model at the end.

CI runs a short version. The full run is 100,000 updates:

    PADDLE_EMA_SOAK_UPDATES=100000 pytest tests/test_soak.py
"""

import os

import numpy as np
import paddle
import pytest

from ema_model import EMAModel, decay_closed_form
from paddle_ema import ExponentialMovingAverage
from processes import rss_bytes

UPDATES = int(os.environ.get("PADDLE_EMA_SOAK_UPDATES", "20000"))



@pytest.mark.soak
@pytest.mark.parametrize("schedule,bias_correction", [("power", True), ("threshold", False)])
def test_soak(schedule, bias_correction):
    layer = paddle.nn.Linear(16, 8)
    rng = np.random.default_rng(0)
    base = {"weight": rng.standard_normal((16, 8)), "bias": rng.standard_normal(8)}
    phase = {k: rng.uniform(0, 2 * np.pi, v.shape) for k, v in base.items()}

    def weights_at(k):  # float32 values, so both sides see exactly the same inputs
        return {n: (base[n] + 0.1 * np.sin(k / 50.0 + phase[n])).astype(np.float32) for n in base}

    ema = ExponentialMovingAverage(layer, 0.9999, schedule=schedule, bias_correction=bias_correction)
    reference = EMAModel({n: p.numpy() for n, p in layer.named_parameters()},
                         lambda t: decay_closed_form(schedule, t, 0.9999), bias_correction)
    warm = min(1000, UPDATES // 10)
    start_rss = None
    for k in range(UPDATES):
        if k == warm:
            start_rss = rss_bytes()
        values = weights_at(k)
        layer.weight.set_value(values["weight"])
        layer.bias.set_value(values["bias"])
        ema.update()
        reference.update(values)
    growth = rss_bytes() - start_rss
    assert ema.num_updates == UPDATES
    for name, want in reference.average().items():
        got = ema.average(name).numpy()
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    assert growth < 8 * 2**20, f"resident memory grew {growth / 2**20:.1f} MiB over {UPDATES - warm} updates"
