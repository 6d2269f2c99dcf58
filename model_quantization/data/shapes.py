"""The embedded default dataset: deterministic synthetic COCO-format images of colored shapes.

Every image holds a few filled shapes (circles, squares, triangles, stars) of random size, rotation and
color on a textured background; later shapes may partly occlude earlier ones (never more than
``1 - min_visible`` of one). Annotations are the *visible* part of each shape: polygon masks traced from the
rasterised visibility mask, and the box around it. Every shape in an image is annotated.

The same :class:`ShapesSpec` always produces byte-identical files (fixed seeds, no global RNG), written
once under a cache directory keyed by the spec's hash. Needs numpy, Pillow and OpenCV (all detectron2
dependencies); does not need detectron2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

CLASS_NAMES = ("circle", "square", "triangle", "star")
#: Every shape the generator can draw; a spec picks four (or any number) of them as its classes.
SHAPES = (*CLASS_NAMES, "pentagon", "cross", "ellipse", "diamond")
BACKGROUNDS = ("gradient", "stripes", "checker")
PALETTES = ("any", "pastel", "dark")
DEFAULT_CACHE = Path(os.environ.get("MQ_DATA_CACHE", Path.home() / ".cache" / "model_quantization"))
#: Bump when the generator's output changes, so stale caches are never reused.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class ShapesSpec:
    """What to generate.

    Attributes:
        num_images: number of images.
        seed: base seed; image ``i`` uses ``(seed, i)`` so subsets are stable when ``num_images`` grows.
        image_size: square image side in pixels.
        min_objects, max_objects: objects drawn per image (before hidden ones are dropped).
        min_size, max_size: shape diameter range as a fraction of ``image_size``.
        min_visible: a shape is never occluded below this fraction of its area (placements that would
            are re-drawn).
        classes: the shapes drawn, in category order (see :data:`SHAPES`).
        background: ``gradient`` (smooth colour ramp), ``stripes`` (random-angle bands of two colours) or
            ``checker`` (a random-size colour checkerboard), each with pixel noise.
        palette: object colours: ``any`` (uniform RGB), ``pastel`` (light) or ``dark``.

    The default generator configuration (the ``shapes_*`` splits) and the held-out one
    (``shapes_heldout_*``: other classes, sizes, counts, colours and backgrounds, never tuned on) differ
    only in these fields.
    """

    num_images: int
    seed: int
    image_size: int = 128
    min_objects: int = 2
    max_objects: int = 6
    min_size: float = 0.12
    max_size: float = 0.45
    min_visible: float = 0.5
    classes: tuple[str, ...] = CLASS_NAMES
    background: str = "gradient"
    palette: str = "any"

    def __post_init__(self) -> None:
        checks = {
            "num_images": self.num_images >= 1,
            "image_size": self.image_size >= 32,
            "min_objects": 1 <= self.min_objects <= self.max_objects,
            "min_size": 0 < self.min_size <= self.max_size < 1,
            "min_visible": 0 < self.min_visible <= 1,
            "classes": len(self.classes) >= 1 and set(self.classes) <= set(SHAPES),
            "background": self.background in BACKGROUNDS,
            "palette": self.palette in PALETTES,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"ShapesSpec.{key}={getattr(self, key)!r} is out of range ({self})")

    def digest(self) -> str:
        fields = dataclasses.asdict(self)
        # Fields added later count only when they differ from the default: existing caches stay valid.
        for name in ("classes", "background", "palette"):
            if fields[name] == getattr(ShapesSpec, name):
                fields.pop(name)
        payload = json.dumps({"version": GENERATOR_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float):
    import numpy as np

    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        radii = np.full_like(t, radius)
    elif kind == "square":
        t = np.linspace(0, 2 * np.pi, 4, endpoint=False) + angle
        radii = np.full_like(t, radius)
    elif kind == "triangle":
        t = np.linspace(0, 2 * np.pi, 3, endpoint=False) + angle
        radii = np.full_like(t, radius)
    elif kind == "star":
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False) + angle
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    elif kind == "pentagon":
        t = np.linspace(0, 2 * np.pi, 5, endpoint=False) + angle
        radii = np.full_like(t, radius)
    elif kind == "diamond":
        t = np.linspace(0, 2 * np.pi, 4, endpoint=False) + angle
        radii = np.where(np.arange(4) % 2 == 0, radius, radius * 0.55)
    elif kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        x, y = radius * np.cos(t), radius * 0.5 * np.sin(t)
        c, s = np.cos(angle), np.sin(angle)
        return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)
    elif kind == "cross":
        arm = 0.35
        corners = [(1, arm), (arm, arm), (arm, 1), (-arm, 1), (-arm, arm), (-1, arm),
                   (-1, -arm), (-arm, -arm), (-arm, -1), (arm, -1), (arm, -arm), (1, -arm)]  # fmt: skip
        x, y = np.array(corners, dtype=float).T * radius * 0.8
        c, s = np.cos(angle), np.sin(angle)
        return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")
    return np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], axis=1)


def _background(rng, size: int, kind: str = "gradient"):
    """A textured background plus noise: shapes must be found by shape and contrast, not by color."""
    import numpy as np

    if kind == "gradient":  # smooth random color ramp between four corners
        corners = rng.uniform(30, 225, size=(2, 2, 3))
        ramp = np.linspace(0.0, 1.0, size)
        wy, wx = ramp[:, None, None], ramp[None, :, None]
        top = corners[0, 0] * (1 - wx) + corners[0, 1] * wx
        bottom = corners[1, 0] * (1 - wx) + corners[1, 1] * wx
        image = top * (1 - wy) + bottom * wy
    else:
        colors = rng.uniform(30, 225, size=(2, 3))
        yy, xx = np.mgrid[0:size, 0:size].astype(float)
        if kind == "stripes":  # bands of two colours at a random angle and width
            angle, width = rng.uniform(0, np.pi), rng.uniform(4, 16)
            band = np.floor((xx * np.cos(angle) + yy * np.sin(angle)) / width).astype(int) % 2
        else:  # checker: a colour checkerboard of random cell size
            cell = rng.uniform(6, 20)
            band = (np.floor(xx / cell) + np.floor(yy / cell)).astype(int) % 2
        image = colors[band]
    return image + rng.normal(0, 12, size=(size, size, 3))


def _color(rng, palette: str):
    """An object colour from the palette."""
    if palette == "pastel":
        return rng.uniform(150, 255, size=3)
    if palette == "dark":
        return rng.uniform(0, 110, size=3)
    return rng.uniform(0, 255, size=3)


def _visibility_ok(masks: list, min_visible: float) -> bool:
    """Whether every mask (bottom first) keeps at least `min_visible` of its area under the ones above."""
    import numpy as np

    covered = np.zeros_like(masks[0])
    for mask in reversed(masks):
        if (mask & ~covered).sum() < min_visible * mask.sum():
            return False
        covered |= mask
    return True


def render_image(spec: ShapesSpec, index: int):
    """Return (uint8 HxWx3 RGB image, list of annotations without ids) for image `index` of `spec`."""
    import cv2
    import numpy as np

    rng = np.random.default_rng([spec.seed, index])
    size = spec.image_size
    image = _background(rng, size, spec.background)
    drawn: list[tuple[int, np.ndarray]] = []  # (class index, full mask), bottom first
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        # Rejection sampling: a new shape may overlap others but never hide more than `1 - min_visible` of
        # any of them, so every shape in the image is annotated (no unlabeled, mostly hidden objects).
        for _attempt in range(20):
            kind = int(rng.integers(len(spec.classes)))
            radius = rng.uniform(spec.min_size, spec.max_size) * size / 2
            cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, size=2)
            polygon = _shape_polygon(spec.classes[kind], cx, cy, radius, rng.uniform(0, 2 * np.pi))
            mask = np.zeros((size, size), np.uint8)
            cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
            mask = mask.astype(bool)
            if mask.sum() >= 16 and _visibility_ok([m for _, m in drawn] + [mask], spec.min_visible):
                break
        else:
            continue
        drawn.append((kind, mask))
        color = _color(rng, spec.palette)
        shade = 1.0 - 0.25 * rng.uniform(size=(size, size, 1))  # mild texture inside the shape
        image = np.where(mask[..., None], color * shade, image)

    annotations = []
    occluded = np.zeros((size, size), bool)
    for kind, mask in reversed(drawn):  # topmost first: everything drawn later hides what is below
        visible = mask & ~occluded
        occluded |= mask
        # Drop 1-2 px slivers left beside an occluder: a polygon cannot trace them, and box, area and mask
        # must describe the same pixels.
        visible = cv2.morphologyEx(visible.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
        if not visible.any():
            continue
        contours, _ = cv2.findContours(visible.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        polygons = [c.reshape(-1, 2).astype(float) + 0.5 for c in contours if len(c) >= 3]
        polygons = [p for p in polygons if cv2.contourArea(p.astype(np.float32)) >= 4]
        if not polygons:
            continue
        ys, xs = np.nonzero(visible)
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        annotations.append(
            {
                "category_id": kind + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(visible.sum()),
                "segmentation": [[round(float(v), 2) for v in p.reshape(-1)] for p in polygons],
                "iscrowd": 0,
            }
        )
    annotations.reverse()  # drawing order, bottom first
    return np.clip(image, 0, 255).astype(np.uint8), annotations


def generate(spec: ShapesSpec, directory: Path) -> Path:
    """Write `images/*.png` and `annotations.json` for `spec` into `directory` (must not exist)."""
    from PIL import Image

    images_dir = directory / "images"
    images_dir.mkdir(parents=True)
    coco = {
        "info": {"description": "model_quantization synthetic shapes", "spec": dataclasses.asdict(spec)},
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(spec.classes)
        ],
        "images": [],
        "annotations": [],
    }
    for index in range(spec.num_images):
        pixels, annotations = render_image(spec, index)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(images_dir / file_name, optimize=False)
        coco["images"].append(
            {"id": index + 1, "file_name": file_name, "height": pixels.shape[0], "width": pixels.shape[1]}
        )
        for annotation in annotations:
            coco["annotations"].append(
                {"id": len(coco["annotations"]) + 1, "image_id": index + 1, **annotation}
            )
    annotation_file = directory / "annotations.json"
    annotation_file.write_text(json.dumps(coco, separators=(",", ":")))
    return annotation_file


def materialize(spec: ShapesSpec, cache_dir: Path | None = None) -> tuple[Path, Path]:
    """Generate `spec` once into the cache and return (annotations.json, image root).

    Safe against concurrent callers (e.g. DDP ranks): each writes into a private temporary directory and
    renames it into place; a loser of the race discards its copy.
    """
    cache_dir = Path(cache_dir or DEFAULT_CACHE) / "shapes"
    target = cache_dir / spec.digest()
    if not (target / "annotations.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{spec.digest()}-", dir=cache_dir))
        generate(spec, scratch / "data")
        try:
            os.rename(scratch / "data", target)
        except OSError:
            if not (target / "annotations.json").is_file():
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target / "annotations.json", target / "images"
