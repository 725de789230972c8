"""Drop-in replacements for the EMA classes and functions of the Paddle suites, one module per suite.

Each module keeps its suite's names, signatures, attributes and state formats, and gives the
suite's numbers bit for bit; docs/migration.md has the one-line change for each suite and the
differences. `ppdet` (PaddleDetection's `ModelEMA` and `SimpleModelEMA`), `ppcls` (PaddleClas),
`paddleseg` (PaddleSeg), `paddleyolo` (PaddleYOLO), `ppocr` (PaddleOCR), `ppdiffusers`
(ppdiffusers' EMAModel and LitEma).
"""
