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
