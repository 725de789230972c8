"""Which parameters an average covers.

By default: trainable parameters only (stop_gradient=False). Paddle keeps BatchNorm's running
statistics `_mean`/`_variance` as parameters with stop_gradient=True; they are skipped, so the live
statistics stay in the model when averaged weights are swapped in. `include_stop_gradient=True`
averages them (and other frozen parameters) like weights.

Exclusion patterns: a plain string excludes names that contain it (PaddleDetection's
`ema_black_list`); a string starting with "re:" or a compiled `re.Pattern` excludes names that the
regular expression matches (re.search). A pattern that matches no candidate is an error: a typo
must not silently average everything.
"""

import re
from typing import Any, Callable, Iterable, List, Optional, Set, Tuple

from .. import _compat
from ..errors import SelectionError

__all__ = ["unwrap", "select_parameters", "compile_patterns", "is_floating", "batchnorm_layers",
           "batchnorm_statistic_names", "is_batchnorm_statistic", "black_listed_keys", "BATCHNORM_STATISTIC_SUFFIXES"]

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# The names Paddle's BatchNorm layers give their running statistics.
BATCHNORM_STATISTIC_SUFFIXES = ("_mean", "_variance")


def unwrap(model: Any) -> Any:
    """The bare Layer inside `paddle.DataParallel` (and other wrappers that keep it as `_layers`).

    Args:
        model: a `paddle.nn.Layer`, bare or wrapped.

    Returns:
        The innermost Layer.
    """
    import paddle

    while isinstance(model, paddle.DataParallel) or (
        type(model).__name__ in ("DataParallel", "DistributedModel", "GroupShardedStage2", "GroupShardedStage3")
        and _compat.unwrap_layers(model) is not None
    ):
        model = _compat.unwrap_layers(model)
    return model


def batchnorm_layers(model: Any, classes: Optional[Iterable[type]] = None) -> List[Tuple[str, Any]]:
    """The model's BatchNorm layers.

    Args:
        model: a `paddle.nn.Layer`, bare or wrapped (`paddle.DataParallel`, ...).
        classes: the layer classes that count; by default every BatchNorm kind (BatchNorm1D/2D/3D,
            SyncBatchNorm, the older paddle.nn.BatchNorm).

    Returns:
        [(name, layer)] in the model's order, names without wrapper prefixes ('' for the model itself).
    """
    classes = _compat.batchnorm_classes() if classes is None else tuple(classes)
    return [(name, layer) for name, layer in unwrap(model).named_sublayers(include_self=True)
            if isinstance(layer, classes)]


def batchnorm_statistic_names(model: Any, classes: Optional[Iterable[type]] = None) -> Set[str]:
    """Names (as in `model.named_parameters()` / `state_dict()`, wrapper prefixes removed) of the
    running statistics `_mean`/`_variance` of the model's BatchNorm layers.

    Args:
        model: a `paddle.nn.Layer`, bare or wrapped.
        classes: narrows which layers count (PaddleDetection's `ema_filter_no_grad` knows only
            BatchNorm2D and SyncBatchNorm); by default every BatchNorm kind does.

    Returns:
        The set of those names.
    """
    names = set()
    for prefix, layer in batchnorm_layers(model, classes):
        for param in _compat.batchnorm_statistics(layer):
            if param is not None:
                names.add(_qualified(prefix, param, layer))
    return names


def is_batchnorm_statistic(key: Any, model: Any = None, classes: Optional[Iterable[type]] = None) -> bool:
    """The package's one answer to "is this state-dict key / parameter a BatchNorm running statistic".

    Args:
        key: a state-dict key or parameter name (wrapper prefixes removed), or a parameter itself.
        model: the model the key belongs to. With it the answer is exact (a name is in
            `batchnorm_statistic_names(model, classes)`, a parameter is one of those layers'
            statistics); without it (state dicts read from files) a name is judged alone: its last
            component is `_mean` or `_variance`, the names Paddle's BatchNorm layers give their
            statistics. A parameter needs the model.
        classes: with `model`, the BatchNorm classes that count (default: every kind).

    Returns:
        True for a running mean or variance.

    For many keys of one model, compute `batchnorm_statistic_names(model)` once instead.
    """
    if model is None:
        if classes is not None:
            raise SelectionError("is_batchnorm_statistic: classes= needs the model= whose layers it narrows")
        if not isinstance(key, str):
            raise SelectionError("is_batchnorm_statistic: a parameter (not a name) needs the model= it belongs to")
        return key.rsplit(".", 1)[-1] in BATCHNORM_STATISTIC_SUFFIXES
    if isinstance(key, str):
        return key in batchnorm_statistic_names(model, classes)
    return any(key is statistic for _, layer in batchnorm_layers(model, classes)
               for statistic in _compat.batchnorm_statistics(layer))


def _qualified(prefix, param, layer):
    local = next(name for name, p in layer.named_parameters(include_sublayers=False) if p is param)
    return f"{prefix}.{local}" if prefix else local


def black_listed_keys(model: Any, black_list: Optional[Iterable[str]] = (), filter_no_grad: bool = False,
                      batchnorm_classes: Optional[Iterable[type]] = None) -> Set[str]:
    """State-dict keys that PaddleDetection-style averages leave live.

    Args:
        model: a `paddle.nn.Layer`, bare or wrapped.
        black_list: a list of substrings; every key containing one is listed (PaddleDetection's
            ema_black_list). A single string is a SelectionError, not a list of its characters.
        filter_no_grad: also list stop_gradient parameters other than BatchNorm statistics.
        batchnorm_classes: the BatchNorm classes whose statistics filter_no_grad keeps
            (every BatchNorm kind by default).

    Returns:
        The set of listed keys.
    """
    if isinstance(black_list, str):
        # PaddleDetection iterates a string's characters: '0.weight' would list every key holding a
        # '.', '0', 'w', ..., which is every key of a nested model. A list is meant.
        raise SelectionError(f"ema_black_list must be a list of substrings, got the string {black_list!r} (its "
                             f"characters would each be a substring, listing nearly every key); write [{black_list!r}]")
    keys = unwrap(model).state_dict().keys()
    listed = {key for key in keys for sub in (black_list or ()) if sub in key}
    if filter_no_grad:
        statistics = batchnorm_statistic_names(model, batchnorm_classes)
        listed.update(name for name, param in unwrap(model).named_parameters()
                      if param.stop_gradient and name not in statistics)
    return listed


def is_floating(tensor: Any) -> bool:
    """Whether `tensor` (a Tensor, parameter or program variable) has a floating dtype.

    Args:
        tensor: anything with a `dtype`.

    Returns:
        True for float16, bfloat16, float32 and float64.
    """
    return any(str(tensor.dtype).endswith(name) for name in _FLOAT_DTYPES)


def compile_patterns(patterns: Any) -> List[Tuple[str, Callable[[str], Any]]]:
    """Exclusion patterns as predicates; validates their types and regexes (SelectionError).

    Args:
        patterns: None, one pattern or a list: substrings, 're:<regex>' strings, re.Pattern objects.

    Returns:
        [(the pattern's text, predicate on a name)].
    """
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        if isinstance(pattern, re.Pattern):
            compiled.append((pattern.pattern, pattern.search))
        elif isinstance(pattern, str) and pattern.startswith("re:"):
            try:
                regex = re.compile(pattern[3:])
            except re.error as exc:
                raise SelectionError(f"exclude pattern {pattern!r} is not a valid regular expression: {exc}") from None
            compiled.append((pattern, regex.search))
        elif isinstance(pattern, str) and pattern:
            compiled.append((pattern, lambda name, sub=pattern: sub in name))
        else:
            raise SelectionError(
                f"exclude entries are non-empty substrings, 're:<regex>' strings or re.Pattern objects, got {pattern!r}"
            )
    return compiled


def select_parameters(model: Any, include_stop_gradient: bool = False, exclude: Any = None) -> List[Tuple[str, Any]]:
    """The parameters an average covers: the one parameter selection of every front-end.

    Args:
        model: a `paddle.nn.Layer` (bare or wrapped), or anything with `named_parameters()`.
        include_stop_gradient: also take stop_gradient parameters (BatchNorm statistics, frozen layers).
        exclude: exclusion patterns (see `compile_patterns`); one that matches no candidate raises
            SelectionError.

    Returns:
        [(name, parameter)] of the floating parameters chosen, in the model's order, names
        without wrapper prefixes.
    """
    layer = unwrap(model)
    candidates = [
        (name, param)
        for name, param in layer.named_parameters()
        if is_floating(param) and (include_stop_gradient or not param.stop_gradient)
    ]
    patterns = compile_patterns(exclude)
    unmatched = [text for text, matches in patterns if not any(matches(name) for name, _ in candidates)]
    if unmatched:
        sample = ", ".join(name for name, _ in candidates[:6]) + (", ..." if len(candidates) > 6 else "")
        raise SelectionError(
            f"exclude pattern(s) {unmatched} match no averaged parameter; parameter names look like: {sample}"
        )
    return [(name, param) for name, param in candidates if not any(matches(name) for _, matches in patterns)]
