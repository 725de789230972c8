import numpy as np
import paddle
import pytest

paddle.set_device("cpu")


@pytest.fixture(autouse=True)
def _seeded():
    paddle.seed(2024)
    np.random.seed(2024)
    yield

