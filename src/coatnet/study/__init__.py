"""Small-scale reproductions of the paper's findings on Fashion-MNIST: layouts, attention, norms.

definitions: the studies as data; runner: training rows through coatnet.train and the resumable JSON;
speed: side-by-side timings; report: the markdown table, plot and reading.
"""
from .definitions import LAYOUT_MODELS, STUDIES, Recipe, Study, Variant, get_study
from .report import write_report
from .runner import plan, read_rows, results_path, run_study, study_of_rows

__all__ = ["LAYOUT_MODELS", "STUDIES", "Recipe", "Study", "Variant", "get_study", "plan", "read_rows",
           "results_path", "run_study", "study_of_rows", "write_report"]
