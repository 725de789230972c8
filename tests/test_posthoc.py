import json
import math

import numpy as np
import paddle
import pytest

from paddle_ema import ConfigError, ExponentialMovingAverage
from paddle_ema.posthoc import PostHocEMA, gamma_to_sigma_rel, profile_coefficients, sigma_rel_to_gamma, synthesize
from paddle_ema.schedules import PowerFunction


def test_sigma_rel_and_gamma_convert_both_ways():
    # The paper's pairs: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for gamma in (0.0, 0.5, 3.0, 40.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, abs=1e-8)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(math.sqrt(1 / 12))
    with pytest.raises(ConfigError, match=r"sigma_rel must be in \(0, 0.2887\]"):
        sigma_rel_to_gamma(0.3)


def test_coefficients_pick_a_stored_profile_and_match_the_continuous_profile():
    snapshots = [(t, g) for t in (100, 200, 300, 400) for g in (16.97, 6.94)]
    x = profile_coefficients(snapshots, 400, 6.94)
    np.testing.assert_allclose(x, np.eye(8)[7], atol=1e-6)
    # A profile between the two stored ones: the combined profile is close to the wanted one on a grid.
    gamma = sigma_rel_to_gamma(0.07)
    x = profile_coefficients(snapshots, 400, gamma)
    tau = np.linspace(1e-3, 400, 4001)

    def profile(t, g):
        return np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)

    def rms(values):
        return np.sqrt(np.mean(values**2))

    combined = sum(c * profile(t, g) for c, (t, g) in zip(x, snapshots))
    wanted = profile(400, gamma)
    nearest_stored = min(rms(profile(t, g) - wanted) for t, g in snapshots)
    assert rms(combined - wanted) < 0.05 * rms(wanted)
    assert rms(combined - wanted) < 0.25 * nearest_stored  # the combination beats any one snapshot


def _random_walk(layer, steps, trackers, seed=0):
    rng = np.random.default_rng(seed)
    w = layer.weight.numpy().astype(np.float64)
    b = layer.bias.numpy().astype(np.float64)
    for _ in range(steps):
        w += rng.standard_normal(w.shape) * 0.05 + 0.002  # noise plus drift, like SGD's iterates
        b += rng.standard_normal(b.shape) * 0.05
        layer.weight.set_value(w.astype(np.float32))
        layer.bias.set_value(b.astype(np.float32))
        for tracker in trackers:
            tracker.update()
    return w


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_synthesised_profiles_reproduce_stored_ones_and_track_direct_emas(tmp_path, dtype):
    layer = paddle.nn.Linear(20, 10)
    posthoc = PostHocEMA(layer, tmp_path, sigma_rels=(0.05, 0.10), snapshot_every=50, snapshot_dtype=dtype)
    gamma = sigma_rel_to_gamma(0.07)
    direct = ExponentialMovingAverage(layer, schedule=PowerFunction(gamma=gamma))
    raw = _random_walk(layer, 1000, [posthoc, direct])

    index = json.loads((tmp_path / "posthoc_index.json").read_text())["snapshots"]
    assert len(index) == 2 * 20 and {e["t"] for e in index} == set(range(50, 1001, 50))
    tolerance = 1e-6 if dtype == "float32" else 2e-3

    stored, info = synthesize(tmp_path, gamma=posthoc.gammas[0])
    assert info["snapshots"][-2]["coefficient"] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(stored["weight"], posthoc.emas[0].average("weight").numpy(), rtol=tolerance, atol=tolerance)

    synthesised, info = synthesize(tmp_path, sigma_rel=0.07)
    tracked = direct.average("weight").numpy()
    # Close to the directly tracked EMA, relative to how far that EMA is from the raw weights.
    error = np.linalg.norm(synthesised["weight"] - tracked) / np.linalg.norm(tracked - raw)
    assert error < (1e-3 if dtype == "float32" else 3e-3), error
    assert info["sigma_rel"] == pytest.approx(0.07)


def test_snapshots_at_earlier_steps_and_errors(tmp_path):
    layer = paddle.nn.Linear(4, 2)
    posthoc = PostHocEMA(layer, tmp_path, sigma_rels=(0.10,), snapshot_every=10, update_every=2)
    _random_walk(layer, 60, [posthoc])
    assert posthoc.emas[0].num_updates == 30  # every second call averaged; snapshots at 10, 20, 30
    weights, info = synthesize(tmp_path, gamma=posthoc.gammas[0], at=20)
    assert [s["t"] for s in info["snapshots"]] == [10, 20] and info["snapshots"][1]["coefficient"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="exactly one of sigma_rel and gamma"):
        synthesize(tmp_path)
    with pytest.raises(ConfigError, match="posthoc_index.json is missing"):
        synthesize(tmp_path / "nothing", gamma=1.0)
