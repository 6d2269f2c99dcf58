"""Post-training calibration time: `nox -s bench -- calibrate` (target: 256 images at 128 px < 1 minute).

Builds each PTQ config of the demo (RetinaNet and FCOS R-18, 8/8 and 4/8, shapes), loads float weights
(a randomly initialised float model of the same architecture: the time does not depend on the values),
and times :func:`model_quantization.calibrate.calibrate_detector` over ``--images`` images of
``shapes_train`` with ``--threads`` CPU threads, data loading included, as ``nox -s calibrate`` runs it.
The load average is printed before and after: numbers taken while other processes use the cores are
flagged, not trusted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from bench._load import LoadCheck  # noqa: E402

CONFIGS = {
    "RetinaNet R-18 8/8": ROOT / "configs/detectron2/shapes/retinanet_R_18_FPN_fullbn_ptq_w8a8.yaml",
    "RetinaNet R-18 4/8": ROOT / "configs/detectron2/shapes/retinanet_R_18_FPN_fullbn_ptq_w4a8.yaml",
    "FCOS R-18 8/8": ROOT / "configs/AdelaiDet/shapes/fcos_R_18_FPN_fullbn_ptq_w8a8.yaml",
    "FCOS R-18 4/8": ROOT / "configs/AdelaiDet/shapes/fcos_R_18_FPN_fullbn_ptq_w4a8.yaml",
}
TARGET_SECONDS = 60.0


def measure(name: str, config: Path, images: int, threads: int) -> dict:
    import torch
    from adet.config import get_cfg
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    import model_quantization.detectron2  # noqa: F401  (registers the shapes splits)
    from model_quantization.calibrate import calibrate_detector, load_float_weights
    from model_quantization.detectron2.config import float_config

    torch.set_num_threads(threads)
    cfg = get_cfg()
    cfg.merge_from_file(str(config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    with tempfile.TemporaryDirectory() as tmp:
        float_cfg = float_config(cfg)
        DetectionCheckpointer(build_model(float_cfg), save_dir=tmp).save("float")
        model = build_model(cfg)
        load_float_weights(model, str(Path(tmp) / "float.pth"))
    start = time.perf_counter()
    report = calibrate_detector(cfg, model, num_images=images)
    return {"name": name, "seconds": time.perf_counter() - start, "report": str(report)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=",".join(CONFIGS), help="comma-separated subset of the rows")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    with LoadCheck() as load:
        rows = [measure(n, CONFIGS[n], args.images, args.threads) for n in names]
    print(f"\nCalibration of {args.images} shapes_train images at 128 px, {args.threads} CPU threads, data "
          f"loading included; {load.line()}.\n")  # fmt: skip
    print("| PTQ config | seconds | target | what was calibrated |")
    print("|---|---:|---|---|")
    for row in rows:
        met = "met" if row["seconds"] <= TARGET_SECONDS else "NOT met"
        print(f"| {row['name']} | {row['seconds']:.1f} | < {TARGET_SECONDS:.0f} s: {met} | {row['report']} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
