from .study import Experiment, Study, StudySettings, load_study, run_study

__all__ = ["load_study", "run_study", "Study", "StudySettings", "Experiment"]
