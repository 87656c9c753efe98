import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_captioner():
    """The shipped default captioner (tests must not change it; those that train copy it)."""
    from mmgradcam.tasks import captioning

    return captioning.load("default")


@pytest.fixture(scope="session")
def shapes_image():
    """A shapes-world image from a seed no split uses (PIL, 128 px)."""
    from PIL import Image

    from mmgradcam.data.shapes import make_image

    return Image.fromarray(make_image(0, seed=31_337, size=128)[0])


@pytest.fixture(scope="module")
def caps(saved):
    """A captioner per tiny model of a family test's ``saved`` ({name: directory}), loaded by path."""
    from mmgradcam.tasks import captioning

    return {name: captioning.load(str(path)) for name, path in saved.items()}


@pytest.fixture(scope="module")
def answerers(saved):
    """An answerer per tiny model of a family test's ``saved`` ({name: directory}), loaded by path."""
    from mmgradcam.tasks import vqa

    return {name: vqa.load(str(path)) for name, path in saved.items()}
