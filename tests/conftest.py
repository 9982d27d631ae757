import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # the tests run tiny models: a second thread only adds overhead


def shared_data_dir() -> Path:
    """The shared corpus/tokenizer/eval folder: $MOR_DATA_DIR, else ``shared/data`` beside the repository."""
    return Path(os.environ.get("MOR_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
