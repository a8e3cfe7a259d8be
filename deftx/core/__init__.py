"""The core of deftx: torch and safetensors only. Parameter roles, exact top-K, DeFT-X denoising,
mask scoring, the SFT artifact (fingerprint, atomic files) and composition. Nothing here imports
configuration, training, jobs, workflows, tracking, Ray, DeepSpeed or MLflow
(tests/test_architecture.py checks it)."""
