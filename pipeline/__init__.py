"""gsp's library: the store, the SAE and its training step, models, corpora, hooks, metrics, configs.

It never imports `stages/` (the stages and the `gsp` command sit above it).

Shape names used throughout (suffixes on tensor names, as in `acts_BD`):
    B  batch (rows or contexts)    S  sequence position (context length C)
    D  d_in of the hooked site     F  d_sae (SAE width)
"""

__version__ = "0.1.0"
