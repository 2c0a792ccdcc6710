"""Block kinds are registered once: a spec class (simcc/specs/blocks.py) and a costing module
(simcc/model/kinds/<kind>.py). Nothing else lists them, so adding a kind touches those two files."""

from __future__ import annotations

from typing import Iterator

import pytest
from pydantic import TypeAdapter, ValidationError

from simcc.model.blocks import Batch, BlockWork, Params, Shard
from simcc.model.graph import ATTACHED_KINDS, block_work, model_params, units_forward_flops, units_of
from simcc.model.kinds import COSTINGS, block_costing
from simcc.model.ops import gemm
from simcc.report.catalog import catalog
from simcc.specs.base import PositiveInt
from simcc.specs.blocks import BLOCK_SPECS, REPEAT_KEYS, BlockSpec, block_spec
from simcc.specs.workload import BlockItem, ModelSpec, block_item_model


def test_every_spec_kind_has_one_costing_module_named_after_it():
    assert set(COSTINGS) == set(BLOCK_SPECS.values()), "a spec kind without a costing module, or the reverse"
    for kind, spec_type in BLOCK_SPECS.items():
        costing = COSTINGS[spec_type]
        assert costing.work.__module__ == costing.params.__module__ == f"simcc.model.kinds.{kind}"


def test_the_workload_schema_and_the_catalog_follow_the_registry():
    assert list(BlockItem.model_fields) == [*BLOCK_SPECS, *REPEAT_KEYS]
    listed = {r["name"]: r["summary"] for r in catalog() if r["kind"] == "block"}
    assert list(listed) == list(BLOCK_SPECS) and all(listed.values())
    assert ATTACHED_KINDS == ("embedding", "lm_head")


def test_a_kind_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="already taken"):
        block_spec("attention")(type("Again", (BlockSpec,), {"__doc__": "again"}))
    with pytest.raises(ValueError, match="already has a costing"):
        spec_type = BLOCK_SPECS["attention"]
        block_costing(spec_type, COSTINGS[spec_type].params)(COSTINGS[spec_type].work)


SEEDS_SEEN: list[int] = []


@pytest.fixture
def tiny_kind() -> Iterator[type[BlockSpec]]:
    """A throwaway kind, registered the way a new one is: one spec class, one costing."""

    @block_spec("tiny_scale")
    class TinyScaleBlock(BlockSpec):
        """A learned per-channel scale: one weight per channel, one multiply per element."""

        channels: PositiveInt

    def params(spec: TinyScaleBlock, hidden: int) -> Params:
        return Params(dense=spec.channels)

    @block_costing(TinyScaleBlock, params, per_layer_seed=True)
    def work(spec: TinyScaleBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
        SEEDS_SEEN.append(shard.seed)
        return BlockWork(forward=[gemm("tiny.scale", batch.tokens, 1, spec.channels, shard.dtype)])

    try:
        yield TinyScaleBlock
    finally:
        del BLOCK_SPECS["tiny_scale"], COSTINGS[TinyScaleBlock]
        SEEDS_SEEN.clear()


def test_a_new_kind_is_read_from_yaml_and_costed(tiny_kind):
    items = TypeAdapter(list[block_item_model(BLOCK_SPECS)])  # the schema ModelSpec gets at import
    blocks = [{"embedding": {"vocab": 100}}, {"repeat": 3, "blocks": [{"tiny_scale": {"channels": 8}}]}]
    model = ModelSpec.model_construct(name="tiny", hidden=8, blocks=items.validate_python(blocks))
    assert model_params(model).total == 100 * 8 + 3 * 8
    assert units_forward_flops(units_of(model), 8, Batch(1, 4, 4)) == 3 * 2 * 4 * 8
    assert len(set(SEEDS_SEEN)) == 1  # an expectation: alike layers share it
    SEEDS_SEEN.clear()
    tiny = [block for unit in units_of(model) for block in unit.blocks if block.kind == "tiny_scale"]
    for block in tiny:  # one simulated step's draw: each layer its own (per_layer_seed)
        block_work(block, 8, Batch(1, 4, 4), Shard(load_draws=1))
    assert len(set(SEEDS_SEEN)) == 3
    with pytest.raises(ValidationError, match="tiny_scale"):  # the valid kinds name it
        items.validate_python([{}])


def test_the_registry_is_left_as_it_was():
    assert "tiny_scale" not in BLOCK_SPECS and len(COSTINGS) == len(BLOCK_SPECS)
