"""Register the embedded shapes dataset in detectron2's catalogs (``shapes_train``, ``shapes_val``, ...).

Registration is cheap and lazy: images are generated (once, into the cache) the first time a split is
loaded, e.g. by ``build_detection_train_loader``. Metadata points COCOEvaluator at the generated
annotation file, so evaluation uses exactly the ground truth the generator wrote.
"""

from __future__ import annotations

from pathlib import Path

from ..data.shapes import DEFAULT_CACHE, ShapesSpec, materialize


def HELDOUT(num_images: int, seed: int) -> ShapesSpec:  # noqa: N802  (reads like the spec it builds)
    """A split of the held-out generator configuration."""
    return ShapesSpec(
        num_images=num_images, seed=seed, min_objects=1, max_objects=8, min_size=0.1, max_size=0.35,
        classes=("pentagon", "cross", "ellipse", "diamond"), background="stripes", palette="pastel",
    )  # fmt: skip


#: The splits every run knows. `shapes_val` holds ~750 objects, so 1 AP differences are above noise;
#: the `tiny` splits are for tests.
DEFAULT_SPLITS: dict[str, ShapesSpec] = {
    "shapes_train": ShapesSpec(num_images=2000, seed=0),
    "shapes_val": ShapesSpec(num_images=200, seed=1),
    # The first 40 images of shapes_val (same seed): the demo's --quick evaluation.
    "shapes_quick_val": ShapesSpec(num_images=40, seed=1),
    "shapes_tiny_train": ShapesSpec(num_images=24, seed=2),
    "shapes_tiny_val": ShapesSpec(num_images=12, seed=3),
    # The held-out generator configuration: other classes, object sizes and counts, colours and
    # backgrounds. The low-bit recipe is confirmed on it and never tuned on it.
    "shapes_heldout_train": HELDOUT(num_images=2000, seed=20),
    "shapes_heldout_val": HELDOUT(num_images=200, seed=21),
}


def register_shapes(name: str, spec: ShapesSpec, cache_dir: str | Path | None = None) -> None:
    """Register a shapes split under `name` (a new name, or the same spec again: idempotent).

    Args:
        name: dataset name to use in ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        spec: what to generate (size, seed, image size, ...).
        cache_dir: where generated splits live (default ``$MQ_DATA_CACHE`` or ``~/.cache/model_quantization``).
    """
    # Imported here, not at the top: detectron2's builtin datasets module imports this module while
    # detectron2.data initialises, so a top-level import would be circular when this module comes first.
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    root = Path(cache_dir or DEFAULT_CACHE)
    target = root / "shapes" / spec.digest()
    if name in DatasetCatalog.list():
        known = MetadataCatalog.get(name).get("shapes_spec", None)
        if known == spec and MetadataCatalog.get(name).get("json_file") == str(target / "annotations.json"):
            return
        raise ValueError(f"dataset {name!r} is already registered with a different definition ({known})")

    def load() -> list[dict]:
        annotation_file, image_root = materialize(spec, root)
        return load_coco_json(str(annotation_file), str(image_root), name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        thing_classes=list(spec.classes),
        json_file=str(target / "annotations.json"),
        image_root=str(target / "images"),
        evaluator_type="coco",
        shapes_spec=spec,
    )


def register_default_shapes(cache_dir: str | Path | None = None) -> None:
    for name, spec in DEFAULT_SPLITS.items():
        register_shapes(name, spec, cache_dir)
