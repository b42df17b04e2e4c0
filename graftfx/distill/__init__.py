"""Distillation: teacher activation cache, stage 1 (spliced operators only), stage 2 (finetuning)."""
from .cache import ActivationCache, CacheSpec, OnlineTeacher, data_fingerprint, write_cache
from .calibration import CalibrationSet
from .pipeline import DistillResult, DistillSettings, distill_plan, load_data, run_distill
from .record import Tap, record
from .stage1 import RegionJob, Stage1Config, train_stage1
from .stage2 import Stage2Config, apply_ema, train_stage2

__all__ = ["ActivationCache", "CacheSpec", "OnlineTeacher", "data_fingerprint", "write_cache", "CalibrationSet",
           "DistillResult", "DistillSettings", "distill_plan", "load_data", "run_distill", "Tap", "record", "RegionJob", "Stage1Config",
           "train_stage1", "Stage2Config", "apply_ema", "train_stage2"]
