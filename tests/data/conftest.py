"""Fixtures of the data-layer tests: official-format roots and a small synthetic corpus."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # data_fixtures, whatever the import mode

import data_fixtures as fx  # noqa: E402


@pytest.fixture
def musicavqa_root(tmp_path: Path) -> Path:
    return fx.write_musicavqa(tmp_path / "musicavqa")


@pytest.fixture
def audiocaps_root(tmp_path: Path) -> Path:
    return fx.write_audiocaps(tmp_path / "audiocaps")


@pytest.fixture
def clotho_root(tmp_path: Path) -> Path:
    return fx.write_clotho(tmp_path / "clotho")


@pytest.fixture
def avsd_root(tmp_path: Path) -> Path:
    return fx.write_avsd(tmp_path / "avsd")


@pytest.fixture
def vqav2_root(tmp_path: Path) -> Path:
    return fx.write_vqav2(tmp_path / "vqav2")


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> dict[str, Path]:
    """The small synthetic corpus, written once per session (seed 0)."""
    from safe_av.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth") / "corpus", seed=0, small=True)
