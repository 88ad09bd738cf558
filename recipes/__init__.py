"""The experiment recipes, installed with the package as ``lightning_byz.recipes``: run one by name,
``lightning-byz fit --config quickstart``, or by path, ``--config recipes/quickstart.yaml``."""
