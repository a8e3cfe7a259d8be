"""The only home of MLflow and matplotlib: the tracker (runs, params, metrics, artifacts; a no-op
when MLflow is unreachable), the SFT registry, the per-SFT run logging and the plots."""
