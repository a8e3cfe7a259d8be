"""Sweeps of selection hyperparameters (``space``: search spaces; ``shared``: the work every trial
reuses; ``tune``: Ray Tune over SFT settings; ``subnetworks``: Ray Tune over a subnetwork system)."""
