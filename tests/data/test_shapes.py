"""The embedded shapes dataset: deterministic, consistent COCO annotations, safe concurrent caching."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_quantization.data import CLASS_NAMES, ShapesSpec, materialize


def _tree_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(directory).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_same_spec_gives_byte_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    spec = ShapesSpec(num_images=6, seed=11)
    a, _ = materialize(spec, tmp_path / "a")
    b, _ = materialize(spec, tmp_path / "b")
    c, _ = materialize(ShapesSpec(num_images=6, seed=12), tmp_path / "c")
    assert _tree_digest(a.parent) == _tree_digest(b.parent)
    assert _tree_digest(a.parent) != _tree_digest(c.parent)
    # Image i depends on (seed, i) only: a larger split starts with the same images.
    longer, _ = materialize(ShapesSpec(num_images=8, seed=11), tmp_path / "d")
    assert (longer.parent / "images/000005.png").read_bytes() == (a.parent / "images/000005.png").read_bytes()


def test_annotations_match_the_pixels(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    spec = ShapesSpec(num_images=20, seed=5, image_size=96)
    annotation_file, image_root = materialize(spec, tmp_path)
    coco = COCO(str(annotation_file))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
    assert len(coco.getAnnIds()) >= 2 * spec.num_images
    for image_info in coco.loadImgs(coco.getImgIds()):
        pixels = np.asarray(Image.open(image_root / image_info["file_name"])).astype(int)
        assert pixels.shape == (96, 96, 3)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_info["id"]))
        assert spec.min_objects - 1 <= len(anns) <= spec.max_objects
        union = np.zeros((96, 96), bool)
        for ann in anns:
            mask = coco.annToMask(ann).astype(bool)
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(mask)
            # the box is the box of the visible mask (polygons trace pixel centres: within a pixel)
            assert abs(xs.min() - x) <= 1 and abs(ys.min() - y) <= 1
            assert abs(xs.max() + 1 - (x + w)) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1
            assert 0.6 * ann["area"] <= mask.sum() <= 1.1 * ann["area"]
            assert not (mask & union).sum() > 0.05 * mask.sum(), "visible masks of different objects overlap"
            union |= mask
            # a shape is one flat color (with mild shading): its pixels vary far less than the image
            assert pixels[mask].std(axis=0).mean() < pixels.reshape(-1, 3).std(axis=0).mean()


def test_occlusion_rule_counts_only_what_lies_above() -> None:
    from model_quantization.data.shapes import _visibility_ok

    bottom = np.zeros((10, 10), bool)
    bottom[:, :5] = True  # 50 px
    top = np.zeros((10, 10), bool)
    top[:, 3:] = True  # hides 20 px of `bottom`: 60% stays visible
    assert _visibility_ok([bottom, top], min_visible=0.6)
    assert not _visibility_ok([bottom, top], min_visible=0.61)
    assert _visibility_ok([top, bottom], min_visible=0.7), "order matters: now `bottom` is on top"


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"num_images": 0}, "num_images"),
        ({"min_objects": 5, "max_objects": 2}, "min_objects"),
        ({"min_size": 0.5, "max_size": 0.2}, "min_size"),
        ({"min_visible": 0}, "min_visible"),
    ],
)
def test_bad_spec_names_the_field(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"ShapesSpec.{key}="):
        ShapesSpec(**{"num_images": 4, "seed": 0, **kwargs})


def _materialize_in_process(cache: str) -> str:
    annotation_file, _ = materialize(ShapesSpec(num_images=10, seed=7), Path(cache))
    return json.loads(Path(annotation_file).read_text())["annotations"][0]["segmentation"][0][0]


def test_concurrent_writers_end_with_one_complete_copy(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_materialize_in_process, [str(tmp_path)] * 3)
    assert len(set(results)) == 1
    entries = sorted(p.name for p in (tmp_path / "shapes").iterdir())
    assert entries == [ShapesSpec(num_images=10, seed=7).digest()], "no leftovers from losing writers"


def test_the_heldout_configuration_draws_other_classes_colours_and_backgrounds(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    from model_quantization.data.shapes import SHAPES

    default = ShapesSpec(num_images=4, seed=21)
    heldout = ShapesSpec(
        num_images=4, seed=21, classes=("pentagon", "cross", "ellipse", "diamond"), background="stripes",
        palette="pastel", max_objects=8,
    )  # fmt: skip
    assert default.digest() != heldout.digest()
    annotation_file, image_root = materialize(heldout, tmp_path)
    coco = COCO(str(annotation_file))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(heldout.classes)
    assert {coco.loadCats(a["category_id"])[0]["name"] for a in coco.loadAnns(coco.getAnnIds())} <= set(
        SHAPES
    )
    for name in ("classes", "background", "palette"):
        with pytest.raises(ValueError, match=name):
            ShapesSpec(num_images=1, seed=0, **{name: ("hexagon",) if name == "classes" else "plaid"})
