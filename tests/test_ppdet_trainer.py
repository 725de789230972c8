"""PaddleDetection's own Trainer with paddle_ema's ModelEMA: resumed runs against an uninterrupted one.

Needs PaddleDetection importable from a source checkout (its configs/ beside ppdet/, e.g.
PYTHONPATH=/path/to/PaddleDetection); skipped otherwise. Trains PicoDet-S (LCNet x0.75, the
checkout's configs/picodet/picodet_s_320_coco_lcnet.yml) on a tiny synthetic COCO set on the CPU:
three epochs of four steps, a checkpoint after each. Each run is its own process, as
tools/train.py is; paddle_ema's ModelEMA goes in from outside PaddleDetection's files, in place of
its ModelEMA in ppdet.engine.trainer, and `exact_resume(trainer, resume)` is the line
docs/migration.md adds after `trainer.resume_weights(...)`.

- resumed from checkpoint 0 with exact_resume: model_final.pdparams, .pdopt and .pdemastate are
  byte-identical to the uninterrupted run's, .pdema's values too (its bytes hold the names deepcopy
  gave its tensors, which count the copies made in the process);
- resumed the trainer's own way: every file byte-identical to PaddleDetection's own ModelEMA
  resumed the same way, and .pdparams not the uninterrupted run's (the double correction).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

ppdet = pytest.importorskip("ppdet", reason="PaddleDetection (ppdet) is not installed")
CHECKOUT = Path(ppdet.__file__).resolve().parents[1]
CONFIG = CHECKOUT / "configs" / "picodet" / "picodet_s_320_coco_lcnet.yml"
if not CONFIG.is_file():
    pytest.skip(f"PaddleDetection's configs are not beside ppdet ({CONFIG} is missing): use a source checkout",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import sys, warnings
warnings.filterwarnings("ignore")  # as PaddleDetection's tools/train.py does
import paddle
paddle.set_device("cpu")
from ppdet.core.workspace import load_config
import ppdet.engine.trainer as trainer_module
import paddle_ema.ppdet

config, resume, mode = sys.argv[1], sys.argv[2], sys.argv[3]
resume = None if resume == "-" else resume
if mode != "ppdet":  # paddle_ema's class where PaddleDetection's trainer looks it up
    trainer_module.ModelEMA = paddle_ema.ppdet.ModelEMA
trainer = trainer_module.Trainer(load_config(config), mode="train")
if resume is not None:
    trainer.resume_weights(resume)
if mode == "exact":
    paddle_ema.ppdet.exact_resume(trainer, resume)
trainer.train()
"""


def synthetic_coco(folder):
    """Eight 96x96 images with two coloured boxes each, and their COCO annotations."""
    import cv2

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(8):
        image = (rng.random((96, 96, 3)) * 60).astype(np.uint8)
        for j, colour in enumerate([(200, 40, 40), (40, 200, 40)]):
            x, y = (int(v) for v in rng.integers(0, 50, 2))
            w, h = (int(v) for v in rng.integers(20, 44, 2))
            cv2.rectangle(image, (x, y), (x + w, y + h), colour, -1)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": j + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        cv2.imwrite(str(folder / "images" / f"{i}.jpg"), image)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 96, "height": 96})
    categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
    (folder / "train.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": categories}))


def config_file(tmp_path, data, save_dir):
    """The checkout's PicoDet-S config, for this data: 192x192 inputs without random transforms,
    no shuffling (every run sees the same batches), no pretrained weights (nothing downloaded)."""
    path = tmp_path / f"{save_dir.name}.yml"
    path.write_text(f"""_BASE_: ['{CONFIG}']
pretrain_weights: ''
use_gpu: false
epoch: 3
snapshot_epoch: 1
worker_num: 0
save_dir: {save_dir}
TrainDataset:
  name: COCODataSet
  image_dir: images
  anno_path: train.json
  dataset_dir: {data}
  data_fields: ['image', 'gt_bbox', 'gt_class', 'is_crowd']
TrainReader:
  sample_transforms:
  - Decode: {{}}
  - Resize: {{target_size: [192, 192], keep_ratio: false, interp: 1}}
  batch_transforms:
  - NormalizeImage: {{is_scale: true, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
  - Permute: {{}}
  - PadGT: {{}}
  batch_size: 2
  shuffle: false
  drop_last: true
LearningRate:
  base_lr: 0.01
  schedulers:
  - !CosineDecay
    max_epochs: 3
  - !LinearWarmup
    start_factor: 0.1
    steps: 2
""")
    return path


def train(tmp_path, data, name, mode, resume=None):
    save_dir = tmp_path / name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(CHECKOUT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(config_file(tmp_path, data, save_dir)), resume or "-", mode],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return save_dir


def same_bytes(a, b):
    return Path(a).read_bytes() == Path(b).read_bytes()


def test_exact_resume_in_paddledetections_trainer(tmp_path):
    data = tmp_path / "data"
    synthetic_coco(data)
    whole = train(tmp_path, data, "whole", "exact")
    assert sorted(p.name for p in whole.iterdir() if p.suffix == ".pdemastate") == [
        "0.pdemastate", "1.pdemastate", "model_final.pdemastate"]
    exact = train(tmp_path, data, "exact", "exact", resume=str(whole / "0"))
    default = train(tmp_path, data, "default", "default", resume=str(whole / "0"))
    theirs = train(tmp_path, data, "theirs", "ppdet", resume=str(whole / "0"))
    final = "model_final"
    for suffix in (".pdparams", ".pdopt", ".pdemastate"):
        assert same_bytes(exact / (final + suffix), whole / (final + suffix)), suffix
    raw, whole_raw = paddle.load(str(exact / (final + ".pdema"))), paddle.load(str(whole / (final + ".pdema")))
    assert list(raw) == list(whole_raw) and len(raw) > 400  # PicoDet-S: 463 state entries
    for name in raw:
        assert np.asarray(raw[name]).tobytes() == np.asarray(whole_raw[name]).tobytes(), name
    for suffix in (".pdparams", ".pdema", ".pdopt"):
        assert same_bytes(default / (final + suffix), theirs / (final + suffix)), suffix
    assert not same_bytes(default / (final + ".pdparams"), whole / (final + ".pdparams"))
