"""What every graftfx trainer shares: the checkpoint scheme (``checkpoint``), the step loop
(``loop``), metrics files (``metrics``), lr schedules (``schedules``), RNG state (``rng``),
nested-state serialisation (``nested``) and loss plots (``plots``)."""
from .checkpoint import Checkpoint, CheckpointStore, agreed_checkpoint, checkpoint_file, step_folder_name
from .loop import run_steps
from .metrics import Metrics
from .nested import flatten, unflatten
from .plots import plot_curves, save_figure
from .rng import restore_rng, rng_state
from .schedules import lr_lambda

__all__ = ["Checkpoint", "CheckpointStore", "agreed_checkpoint", "checkpoint_file", "step_folder_name", "run_steps", "Metrics",
           "flatten", "unflatten", "plot_curves", "save_figure", "restore_rng", "rng_state", "lr_lambda"]
