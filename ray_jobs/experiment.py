"""`ray job submit` entry point: a results experiment (`deftx experiment`) with every training unit
on Ray Train workers under DeepSpeed (ZeRO 0-2: the multi-source task SFTs need whole parameters).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/experiment.py nusax --preset full --set pipeline.cluster.backend=ray \
        --output-dir /shared/runs/experiment-nusax-full

The presets use the local backend: on a 2-core machine one process is about 3x faster than two
Ray Train workers (benchmarks/README.md). Arguments are those of `deftx experiment` (`--help`).
"""

import sys

from deftx.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]]))
