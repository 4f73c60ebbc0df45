"""The tiered block store (``TieredStore``) and the plans of its two-phase calls."""

from kvstore.store.plans import BlockRead, BlockWrite, PutPlan, ReadPlan
from kvstore.store.tiered import TieredStore

__all__ = ["BlockRead", "BlockWrite", "PutPlan", "ReadPlan", "TieredStore"]
