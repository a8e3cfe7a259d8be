"""The results experiments: configuration, the runner of their units, the report."""
