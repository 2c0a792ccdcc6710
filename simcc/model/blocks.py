"""What a block costs: the public face of the per-kind costing in simcc/model/kinds/.

The types every kind's costing takes and returns (Batch, Shard, Params, BlockWork, MoEStats) and
the few per-kind functions other layers use by name. Dispatch by kind is model/graph.py's, through
the registry in simcc/model/kinds/.
"""

from __future__ import annotations

from simcc.model.kinds._shared import Batch, BlockWork, MoEStats, Params, Shard, ffn_params
from simcc.model.kinds.attention import kv_cache_bytes_per_token
from simcc.model.kinds.dense_ffn import work as dense_ffn_work
from simcc.model.kinds.embedding import distinct_rows

__all__ = ["Batch", "BlockWork", "MoEStats", "Params", "Shard", "dense_ffn_work", "distinct_rows", "ffn_params",
           "kv_cache_bytes_per_token"]
