"""imgrec: content-based image search (colour, perceptual hash, deep embedding, mix) over a Parquet lake."""

from imgrec._native import load_libstdcxx_globally

__version__ = "0.1.0"

load_libstdcxx_globally()  # before usearch: see imgrec._native
