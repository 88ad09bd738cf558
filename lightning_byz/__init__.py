"""lightning-byz: Byzantine-robust, asynchronous parameter-server training for PyTorch Lightning.

``Trainer(strategy=AsyncPSStrategy(...))`` (or ``strategy="async_ps"``) replaces all-reduce with a
robust parameter-server exchange over MPI, or simulates the workers in one process.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_byz.strategy import AsyncPSStrategy

AsyncPSStrategy.register_strategies(StrategyRegistry)

__all__ = ["AsyncPSStrategy"]
__version__ = "0.1.0"
