"""Integrations with training frameworks, each in its own module and imported only on request.

`paddle_ema.integrations.paddleformers`: `EMACallback` for PaddleFormers' `Trainer` and
`load_ema_weights` for its checkpoints (needs `pip install "paddle_ema[paddleformers]"`). Importing
`paddle_ema` or this package imports no framework.
"""

__all__: list = []
