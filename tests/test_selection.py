"""The one BatchNorm-statistic test and the PaddleDetection-style black list."""

import paddle
from paddle import nn

from paddle_ema.selection import batchnorm_statistic_names, black_listed_keys


class Net(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(1, 2, 3)
        self.bn2 = nn.BatchNorm2D(2)
        self.bn1 = nn.BatchNorm1D(2)
        self.old = nn.BatchNorm(2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.weight.stop_gradient = True
        self.head = nn.Linear(2, 2)


def test_batchnorm_statistic_names_cover_every_batchnorm_kind():
    names = batchnorm_statistic_names(paddle.DataParallel(Net()))
    assert names == {f"{b}.{s}" for b in ("bn2", "bn1", "old") for s in ("_mean", "_variance")}
    keys = set(Net().state_dict())
    assert names <= keys


def test_batchnorm_classes_narrow_the_answer():
    assert batchnorm_statistic_names(Net(), (nn.BatchNorm2D, nn.SyncBatchNorm)) == {"bn2._mean", "bn2._variance"}


def test_black_listed_keys():
    model = Net()
    assert black_listed_keys(model, ["head"]) == {"head.weight", "head.bias"}
    # filter_no_grad: frozen non-BatchNorm parameters; with PaddleDetection's two classes the
    # statistics of BatchNorm1D and the old BatchNorm count as frozen parameters too.
    assert black_listed_keys(model, filter_no_grad=True) == {"frozen.weight"}
    narrow = black_listed_keys(model, filter_no_grad=True, batchnorm_classes=(nn.BatchNorm2D, nn.SyncBatchNorm))
    assert narrow == {"frozen.weight", "bn1._mean", "bn1._variance", "old._mean", "old._variance"}


def test_is_batchnorm_statistic_with_and_without_the_model():
    import pytest

    from paddle_ema.errors import SelectionError
    from paddle_ema.selection import is_batchnorm_statistic

    model = Net()
    keys = list(model.state_dict())
    exact = {k for k in keys if is_batchnorm_statistic(k, model)}
    assert exact == {f"{b}.{s}" for b in ("bn2", "bn1", "old") for s in ("_mean", "_variance")}
    assert {k for k in keys if is_batchnorm_statistic(k, model, (nn.BatchNorm2D,))} == {"bn2._mean", "bn2._variance"}
    # From the name alone (state dicts read from files): the same answer for Paddle's own names,
    # and a lookalike such as `head.my_mean` is not one.
    assert {k for k in keys if is_batchnorm_statistic(k)} == exact
    assert is_batchnorm_statistic("_mean") and not is_batchnorm_statistic("head.my_mean")
    with pytest.raises(SelectionError, match="classes= needs the model="):
        is_batchnorm_statistic("bn2._mean", classes=(nn.BatchNorm2D,))
    # A parameter itself, by identity with the layers' statistics.
    params = dict(model.named_parameters())
    assert exact <= set(params)
    assert {n for n, p in params.items() if is_batchnorm_statistic(p, model)} == exact
    assert not is_batchnorm_statistic(params["bn2.weight"], model)
    with pytest.raises(SelectionError, match="needs the model="):
        is_batchnorm_statistic(params["bn2._mean"])


def test_the_front_ends_share_the_one_answer():
    from paddle_ema import batchnorm, ppdet, selection

    model = Net()
    assert batchnorm.batchnorm_layers is selection.batchnorm_layers
    assert [name for name, _ in batchnorm.batchnorm_layers(model)] == ["bn2", "bn1", "old"]
    assert ppdet.bn_running_state_names(model) == {"bn2._mean", "bn2._variance"}
    ema = ppdet.ModelEMA(model, ema_black_list=["head"], ema_filter_no_grad=True)
    assert ema.ema_black_list == {"head.weight", "head.bias", "frozen.weight", "bn1._mean", "bn1._variance",
                                  "old._mean", "old._variance"}
