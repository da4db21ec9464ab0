"""Run under torchrun: ``dumo train CONFIG --out BASE/node<RANK> ...``, as if every node had its own
local run folder instead of a shared one (each rank sees only the folder of its "node")."""

import os
import sys

from dumo.cli import main

config, base, *arguments = sys.argv[1:]
sys.exit(main(["train", config, "--out", os.path.join(base, f"node{os.environ['RANK']}"), *arguments]))
