"""`ray job submit` entry point: one SFT (a language SFT, or a task SFT on top of a source-language
SFT), every phase on Ray Train workers under DeepSpeed.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/train_sft.py --kind language --lang jav --config CONFIG.yaml --output-dir /shared/sfts/lang-jav
    ray job submit ... -- python ray_jobs/train_sft.py --kind task --lang-sft /shared/sfts/lang-ind \
        --config CONFIG.yaml --output-dir /shared/sfts/task-nusax_senti

Run directly it starts an embedded Ray on 127.0.0.1, or joins `--address HOST:6379`. The other
arguments are those of `deftx train-lang` / `deftx train-task` (`--kind language --help`).
"""

import argparse
import sys

from deftx.cli import main

COMMANDS = {"language": "train-lang", "task": "train-task"}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="train_sft.py", add_help=False)
    parser.add_argument("--kind", choices=sorted(COMMANDS), required="--help" not in sys.argv and "-h" not in sys.argv)
    known, rest = parser.parse_known_args()
    if known.kind is None:
        parser.print_usage()
        print("--kind language|task selects `deftx train-lang` or `deftx train-task`; add --kind K --help for its options")
        sys.exit(0)
    sys.exit(main([COMMANDS[known.kind], *rest]))
