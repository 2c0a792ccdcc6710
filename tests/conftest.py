from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def root() -> Path:
    return ROOT


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def with_intra_fits(system, fits: list):
    """`system` with its intra-node link's measured collective lines replaced (none: the link model alone)."""
    import dataclasses

    return dataclasses.replace(system, intra_link=system.intra_link.model_copy(update={"fits": fits}))
