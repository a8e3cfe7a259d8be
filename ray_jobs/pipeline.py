"""`ray job submit` entry point: the NusaX pipeline (language SFTs for the source and target
languages, the task SFT, zero-shot evaluation) with every phase on Ray Train workers under DeepSpeed.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/pipeline.py --config CONFIG.yaml --output-dir /shared/runs/nusax

Run directly (`python ray_jobs/pipeline.py --preset demo`) it starts an embedded Ray on 127.0.0.1,
or joins `--address HOST:6379`. Arguments are those of `deftx pipeline` (`--help`).
"""

import sys

from deftx.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
