#!/bin/sh
# Two virtual NUMA nodes of 16 MiB, one vCPU each. The bundled numa-mem guest fills node 1 with
# 20 MiB of checksummed data while node 0 idles: the host balancer balloons node 0's idle pages
# (the host's memory really falls) and hot-adds memory to node 1. The guest checks every page at
# the end and powers off (status 0). The balancer's decisions go to mem.jsonl, one JSON object a
# line; `python3 scripts/memory_chart.py mem.jsonl -o mem.svg` draws them. Extra arguments go to
# `pykvm run` (e.g. --control vm.sock, then `pykvm ctl vm.sock numa` from another shell).
exec pykvm run numa-mem --numa-node mem=16M,cpus=0 --numa-node mem=16M,cpus=1 \
    --cmdline "grow=20 settle=20" --memory-log mem.jsonl --timeout 300 "$@"
