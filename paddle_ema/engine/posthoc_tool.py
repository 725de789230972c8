"""tools/posthoc_ema.py: EMA weights of any length after training, from the post-hoc snapshots.

A run with `ema_posthoc: true` stored power-function EMA snapshots in <output>/<name>/posthoc/.
For each requested profile (relative width sigma_rel, or exponent gamma) this synthesises the
averaged weights (paddle_ema.posthoc.synthesize), completes them with the run's final raw
weights for entries that are not averaged, optionally recomputes BatchNorm statistics, writes
<output>/<name>/posthoc_sigma<S>.pdparams and, with --eval, reports the accuracy of each.
"""

import os

from ..checkpoint import atomic_save, safe_load
from ..errors import ConfigError
from ..posthoc import INDEX, gamma_to_sigma_rel, sigma_rel_to_gamma, synthesize

__all__ = ["DEFAULT_SWEEP", "posthoc_weights"]

DEFAULT_SWEEP = (0.02, 0.04, 0.06, 0.08, 0.10, 0.15, 0.20, 0.25)


def posthoc_weights(cfg, run_dir, snapshots, sigma_rels, at=None, update_bn=False, do_eval=False):
    """[(sigma_rel, gamma, path, accuracy or None)] for each profile; writes one .pdparams each."""
    import paddle

    from .average_files import recompute_bn_statistics
    from .run_checkpoints import check_fits, copy_state
    from .evaluation import evaluate
    from .builders import build_datasets, build_model, set_device

    if not os.path.exists(os.path.join(snapshots, INDEX)):
        raise ConfigError(f"no post-hoc EMA snapshots in {snapshots}: train with -o ema_posthoc=true first")
    raw_file = next((os.path.join(run_dir, f"model_final{s}") for s in (".pdema", ".pdparams")
                     if os.path.exists(os.path.join(run_dir, f"model_final{s}"))), None)
    if raw_file is None:
        raise ConfigError(f"{run_dir} has no model_final checkpoint to take the non-averaged entries from")
    set_device(cfg)
    data = build_datasets(cfg, ("train", "eval") if do_eval else ("train",))
    model = build_model(cfg, data["train"])
    base = safe_load(raw_file, "final raw weights")
    check_fits(model, base, f"weights {raw_file}")
    results = []
    for sigma_rel in sigma_rels:
        averaged, info = synthesize(snapshots, sigma_rel=sigma_rel, at=at)
        unknown = sorted(set(averaged) - set(base))
        if unknown:
            raise ConfigError(f"the snapshots in {snapshots} hold entries this model lacks: {unknown[:5]}")
        state = {name: paddle.to_tensor(averaged[name]).astype(value.dtype) if name in averaged else value
                 for name, value in base.items()}
        model.set_state_dict(state)
        if update_bn:
            recompute_bn_statistics(model, data["train"], cfg["EvalReader"]["batch_size"], cfg["update_bn_batches"])
        path = os.path.join(run_dir, f"posthoc_sigma{sigma_rel:.3f}.pdparams")
        atomic_save(copy_state(model.state_dict()), path)
        accuracy = evaluate(model, data["eval"], cfg["EvalReader"]["batch_size"]) if do_eval else None
        results.append((sigma_rel, info["gamma"], path, accuracy, info["at"]))
    return results


def parse_profiles(sigma_rels, gammas):
    """The requested sigma_rels (gammas converted), or the default sweep."""
    profiles = list(sigma_rels or [])
    for gamma in gammas or []:
        profiles.append(gamma_to_sigma_rel(gamma))
    for sigma_rel in profiles:
        sigma_rel_to_gamma(sigma_rel)  # validates the range
    return profiles or list(DEFAULT_SWEEP)
