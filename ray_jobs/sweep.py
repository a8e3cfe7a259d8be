"""`ray job submit` entry point: a Ray Tune sweep of the selection hyperparameters, one experiment
per target language, every trial a Ray Train run of DeepSpeed workers, tracked and registered in MLflow.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/sweep.py --space tune_spaces/nusax.yaml --languages jav,sun,min --num-samples 8 \
        --preset demo --set tracking.uri=http://MLFLOW:5000

Run directly it starts an embedded Ray on 127.0.0.1, or joins `--address HOST:6379`. Arguments are
those of `deftx sweep` (`--help`); the same command resumes an interrupted sweep.
"""

import sys

from deftx.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
