#!/usr/bin/env python
"""Prepare a raw dataset download: the same as `tbps-clip prep ...` (see docs/real-data.md).

    python data_prep/prepare.py cuhk-pedes /data/CUHK-PEDES [--drop KINDS] [--out FILE]
    python data_prep/prepare.py icfg-pedes /data/ICFG-PEDES
    python data_prep/prepare.py rstpreid /data/RSTPReid
    python data_prep/prepare.py official /data/tbps-official/CUHK-PEDES
    python data_prep/prepare.py merge-bt /data/CUHK-PEDES/annotations.json /data/tbps-official/CUHK-PEDES
"""
import sys

from tbps_clip.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep", *sys.argv[1:]]))
