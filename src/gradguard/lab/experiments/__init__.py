"""One module per lab experiment; each exposes ``INFO`` (an :class:`~gradguard.lab.experiment.ExperimentInfo`)."""
