"""Controller fixtures: tiny random diffusers pipelines built in-process (no downloads)."""

import pytest

from legion.controller.pipelines import build_tiny_pipeline


@pytest.fixture(scope="module")
def text2img():
    return build_tiny_pipeline("text2img", seed=0)


@pytest.fixture(scope="module")
def inpainter():
    return build_tiny_pipeline("inpaint", seed=0)
