"""Data: text sources by name, document packing with boundary masks, cached packed splits, batch order."""

from sekd.data.dataset import batches, build_packed, epoch_order, tokenizer_signature
from sekd.data.packing import IGNORE, PackedData, pack_documents
from sekd.data.qa import QA_SOURCES, build_qa, check_qa_source, prompt_ids, prompt_lengths
from sekd.data.sources import SOURCES, DataError, check_source

__all__ = [
    "IGNORE",
    "SOURCES",
    "DataError",
    "PackedData",
    "QA_SOURCES",
    "batches",
    "build_packed",
    "build_qa",
    "check_qa_source",
    "check_source",
    "epoch_order",
    "pack_documents",
    "prompt_ids",
    "prompt_lengths",
    "tokenizer_signature",
]
