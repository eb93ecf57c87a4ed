"""Data: text sources by name, document packing with boundary masks, cached packed splits, batch order."""
from sekd.data.dataset import batches, build_packed, epoch_order, tokenizer_signature
from sekd.data.packing import IGNORE, PackedData, pack_documents
from sekd.data.sources import SOURCES, DataError, check_source

__all__ = [
    "IGNORE",
    "SOURCES",
    "DataError",
    "PackedData",
    "batches",
    "build_packed",
    "check_source",
    "epoch_order",
    "pack_documents",
    "tokenizer_signature",
]
