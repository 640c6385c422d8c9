"""Distributed plumbing: quantized collectives (:mod:`.collectives`), wire-byte
accounting and closed forms (:mod:`.accounting`), DTensor helpers (:mod:`.dtensor`).
Internal: the public names are re-exported by :mod:`dion_lp`."""
