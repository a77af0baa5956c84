"""imgrec: content-based image search (colour, perceptual hash, deep embedding, mix) over a Parquet lake."""

__version__ = "0.1.0"
