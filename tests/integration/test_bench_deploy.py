"""bench/deploy.py builds its latency models from the project's configs with random weights (speed itself is
not tested here: it is what ``nox -s bench -- deploy`` prints)."""

from __future__ import annotations

import pytest

from bench import deploy

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("arch", ["retinanet_shapes", "fcos_shapes"])
def test_latency_models_build_from_the_recipe_configs_without_a_checkpoint(patched_tree, arch) -> None:
    # The *_mixed recipe distills from MODEL.WEIGHTS; a latency model has random weights and never trains,
    # so it must build without a teacher checkpoint.
    for config in deploy.ARCHS[arch]:
        cfg, model = deploy._random_model(config, [])
        assert cfg.MODEL.WEIGHTS == "" and not model.training
