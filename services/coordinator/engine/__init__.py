"""The generation engine: non-SI, SI and DSI over abstract Target/Drafter.

- :mod:`.types`: what a generation is asked to do and what it reports;
- :mod:`.generation`: the engine and what every strategy shares (committed
  sequence, statistics, RPCs, cleanup);
- :mod:`.sequential`: non-SI and SI;
- :mod:`.dsi` and :mod:`.drafting`: DSI's scheduling, deciding and drafting;
- :mod:`.observe`: the hook that hears of every verification, draft and commit.

The decision rule itself (which token the target puts at a position) lives in
:mod:`dsi.domain.sampling`.
"""

from services.coordinator.engine.generation import Engine, Generation
from services.coordinator.engine.observe import Observer, Outcome
from services.coordinator.engine.types import FinishReason, GenerationParams, GenerationStats, Strategy

__all__ = [
    "Engine",
    "FinishReason",
    "Generation",
    "GenerationParams",
    "GenerationStats",
    "Observer",
    "Outcome",
    "Strategy",
]
