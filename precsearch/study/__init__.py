"""The Optuna side: search settings, the study and its storage, the trial record, the Pareto front, the backends."""
