import functools
import os
import tempfile
from pathlib import Path

import pytest
import torch

from edgevits.testing import calibrated, import_timm, make_image_folder

torch.set_num_threads(max(1, int(os.environ.get("EDGEVITS_TEST_THREADS", "1"))))
# edgevits' cache (exported graphs, downloads) in a folder of this test process, not the user's
os.environ["EDGEVITS_CACHE"] = tempfile.mkdtemp(prefix="edgevits-test-cache-")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@functools.cache
def _timm_reference(name: str, img_size: int | None = None):
    kwargs = {} if img_size is None else {"img_size": img_size}
    size = img_size or 224
    return calibrated(import_timm().create_model(name, **kwargs), batches=1, batch_size=4, size=size)


@pytest.fixture(scope="session")
def timm_reference():
    """``timm_reference(name, img_size=None)``: timm's model with randomised weights and calibrated BatchNorms
    (built once per worker; do not change it)."""
    return _timm_reference


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A tiny ImageFolder (``train/`` and ``val/``, three classes of generated pictures), shared read-only."""
    return make_image_folder(tmp_path_factory.mktemp("data"))
