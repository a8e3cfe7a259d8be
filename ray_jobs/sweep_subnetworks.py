"""`ray job submit` entry point: a Ray Tune sweep of a subnetwork system's settings
(`deftx sweep-subnetworks`), e.g.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/sweep_subnetworks.py nusax --preset subnetworks-full \
        --space tune_spaces/nusax-subnetworks.yaml --num-samples 16

Arguments are those of `deftx sweep-subnetworks` (`--help`).
"""

import sys

from deftx.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep-subnetworks", *sys.argv[1:]]))
