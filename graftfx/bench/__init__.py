"""``graftfx bench``: operator microbenchmarks and the crossover report.

    graftfx bench --op swa --shape pixart-1024          # table: op, path, shape, ms, GB/s, ...
    graftfx bench --crossover                           # where each operator overtakes SDPA
    graftfx bench --model DiT-XL/2 --rules dit-xl2-mha-swa-50p.toml

``harness`` times callables and measures the device's ceilings, ``cases`` builds operators
from the registry at bench shapes (with their reference paths), ``runner`` times them,
``crossover`` sweeps the token count, ``model`` groups a model's matched regions, ``report``
prints the markdown and writes the JSON, ``cli`` is the command.
"""
from .cases import PRESETS, OpCase, Shape, operator_cases, resolve_shapes
from .crossover import crossover_point, run_crossover, sweep_lengths
from .harness import Ceilings, Timing, measure_ceilings, time_callable
from .runner import Bench, Result, TimerSettings, bytes_moved, run_ops

__all__ = ["PRESETS", "Bench", "Ceilings", "OpCase", "Result", "Shape", "TimerSettings", "Timing",
           "bytes_moved", "crossover_point", "measure_ceilings", "operator_cases", "resolve_shapes",
           "run_crossover", "run_ops", "sweep_lengths", "time_callable"]
