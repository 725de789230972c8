"""Drop-in replacements for the EMA classes of the Paddle suites, one module per suite:
`ppdet` (PaddleDetection's `ModelEMA` and `SimpleModelEMA`)."""
