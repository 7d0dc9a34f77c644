"""Block-trace reading for replay: streaming readers that yield numpy record batches
(RECORD_DTYPE), format detection, conversion to fio iologs and trace statistics.

    from dataplane.replay import open_trace
    for batch in open_trace("hm_0.csv.gz"):          # format detected, gzip transparent
        batch["time_ns"], batch["op"], batch["offset"], batch["length"], batch["stream"]
"""

from .base import TraceReader
from .blktrace import BlkparseReader, BlktraceReader
from .csvtraces import AlibabaReader, MsrReader, SpcReader
from .detect import FORMATS, READERS, detect_format, open_trace
from .fio import FioIologReader
from .records import BATCH_RECORDS, OP_NAMES, RECORD_DTYPE, Op, TraceFormatError

__all__ = [
    "BATCH_RECORDS",
    "FORMATS",
    "OP_NAMES",
    "READERS",
    "RECORD_DTYPE",
    "AlibabaReader",
    "BlkparseReader",
    "BlktraceReader",
    "FioIologReader",
    "MsrReader",
    "Op",
    "SpcReader",
    "TraceFormatError",
    "TraceReader",
    "detect_format",
    "open_trace",
]
