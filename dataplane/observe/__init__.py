"""Looking at I/O patterns: charts of block traces and of replay/load reports."""
