"""Data files shipped with the package (read with ``importlib.resources``); see ``lrnnx_zoo.data``.

- ``sunspots_monthly.csv``: NOAA monthly mean sunspot numbers 1749-01..2009-06, public domain
  (provenance and licence in the file's header comment).
"""
