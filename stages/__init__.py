"""One module per stage: harvest, fit, evaluate; each with one config and one entry function."""
