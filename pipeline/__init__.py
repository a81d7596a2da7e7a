"""gsp's library: the store, model and corpus loading, hooks, configs and the CLI.

Shape names used throughout (suffixes on tensor names, as in `acts_BD`):
    B  batch (rows or contexts)    S  sequence position (context length C)
    D  d_in of the hooked site     F  d_sae (SAE width)
"""

__version__ = "0.1.0"
