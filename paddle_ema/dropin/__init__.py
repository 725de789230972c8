"""Drop-in replacements for the EMA classes and functions of the Paddle suites.

Each module keeps its suite's names, signatures, attributes and state formats, and gives the
suite's numbers bit for bit; docs/migration.md has the one-line change for each suite and the
differences. `paddle_ema.dropin.ppcls` (PaddleClas), `.paddleseg` (PaddleSeg), `.paddleyolo`
(PaddleYOLO), `.ppocr` (PaddleOCR), `.ppdiffusers` (ppdiffusers' EMAModel and LitEma).
"""
