import numpy as np
import paddle
from sklearn.datasets import load_digits

from paddle_ema.callbacks import EMACallback


class Digits(paddle.io.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __len__(self):
        return len(self.labels)


def _data():
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32").reshape(-1, 64)
    y = digits.target.astype("int64").reshape(-1, 1)
    return Digits(x[:1200], y[:1200]), Digits(x[1200:], y[1200:])


def test_callback_updates_evaluates_with_ema_and_saves(tmp_path):
    paddle.seed(0)
    train, test = _data()
    network = paddle.nn.Sequential(paddle.nn.Linear(64, 32), paddle.nn.ReLU(), paddle.nn.Linear(32, 10))
    model = paddle.Model(network)
    model.prepare(
        paddle.optimizer.Momentum(learning_rate=0.1, momentum=0.9, parameters=network.parameters()),
        paddle.nn.CrossEntropyLoss(),
        paddle.metric.Accuracy(),
    )
    seen = []

    class Spy(paddle.callbacks.Callback):  # records the weights the evaluation inside fit used
        def on_eval_batch_begin(self, step, logs=None):
            if step == 0:
                seen.append(network[0].weight.numpy().copy())

    callback = EMACallback(decay=0.99, save_dir=str(tmp_path))
    model.fit(train, test, batch_size=64, epochs=2, verbose=0, callbacks=[callback, Spy()])
    steps = 2 * int(np.ceil(1200 / 64))
    assert callback.ema.num_updates == steps
    # The last evaluation inside fit ran with the EMA weights, and fit's raw weights came back after.
    np.testing.assert_array_equal(seen[-1], callback.ema.average("0.weight").numpy())
    assert not np.array_equal(network[0].weight.numpy(), seen[-1])

    raw = model.evaluate(test, batch_size=64, verbose=0)
    with_callback = model.evaluate(test, batch_size=64, verbose=0, callbacks=[callback])
    with callback.ema.apply():
        manual = model.evaluate(test, batch_size=64, verbose=0)
    assert with_callback["loss"] == manual["loss"] and with_callback["acc"] == manual["acc"]
    assert with_callback["loss"] != raw["loss"]

    saved = paddle.load(str(tmp_path / "ema_final.pdparams"))
    np.testing.assert_array_equal(saved["0.weight"].numpy(), callback.ema.average("0.weight").numpy())
    assert (tmp_path / "ema_0.pdparams").exists() and (tmp_path / "ema_final.pdopt").exists()
    state = paddle.load(str(tmp_path / "ema_final.pdema_state"))
    assert state["num_updates"] == steps
