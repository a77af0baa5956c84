"""Offline jobs that write the lake: ingestion (walk -> extract -> embed -> commit) and index building."""
